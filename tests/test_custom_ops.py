"""torch.ops.maverick.*: every registered op passes torch.library.opcheck (schema, fake/meta
implementation against the real one, no aliasing, declared mutation) and returns what the Python
entry point returns."""
import pytest
import torch

import maverick_plugins as ops
import maverick_plugins.library  # noqa: F401  (registers torch.ops.maverick.*)
from maverick_plugins.fp8 import quantize_fp8_static

from test_kernels import _attention_case, _qkv_attention_case


def _fp8_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 32).clamp(-448, 448).to(torch.float8_e4m3fn)


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, generator=g)
    w8, s, xs = _fp8_weight(24, 32, 1), torch.tensor(1 / 180.0), torch.tensor(4 / 448)
    yield "fp8_linear", (x, w8, s, xs, torch.float32)
    yield "fp8_linear", (x, w8, s, None, torch.bfloat16)  # dynamic per-token activations
    yield "fp8_linear_swiglu", (x, w8, s, xs, torch.float32)
    yield "rms_norm", (x, torch.randn(32, generator=g), 1e-5)
    yield "embedding_rows", (torch.tensor([3, 40, 17, 9]), torch.randn(16, 32, generator=g).bfloat16(), 8)
    yield "rope_cos_sin", (torch.tensor([0, 5, 131071, -1]), 1.0 / 500000 ** (torch.arange(0, 16, 2) / 16))
    yield "add_rms_norm", (x, torch.randn(3, 32, generator=g), torch.randn(32, generator=g), 1e-5)
    yield "moe_router", (x, torch.randn(8, 32, generator=g), 2)
    E, I = 4, 8
    gu8 = torch.stack([_fp8_weight(2 * I, 32, 10 + e) for e in range(E)])
    dn8 = torch.stack([_fp8_weight(32, I, 20 + e) for e in range(E)])
    ids = torch.tensor([[0], [3], [5]])  # 5: another rank's expert
    sc = torch.rand(3, 1, generator=g)
    yield "moe_experts", (x, ids, sc, gu8, dn8, 0, s, xs, s, xs)
    yield "moe_experts", (x, ids, sc, gu8.float(), dn8.float(), 2, None, None, None, None)
    shared = (_fp8_weight(2 * I, 32, 30), torch.rand(2 * I, generator=g) / 100, xs, _fp8_weight(32, I, 31), s, xs)
    yield "moe_ffn", (x, ids, sc, gu8, dn8, 0, s, xs, s, xs, *shared)
    yield "moe_block", (x[:1], torch.randn(8, 32, generator=g), 1, gu8, dn8, 0, s, xs, s, xs, *shared)
    for chunk, fp8 in ((None, False), (32, True)):
        a = _attention_case(2, 3, [20, 45], chunk, fp8)
        yield "paged_attention", a
        q, k, v, kc, vc = a[:5]
        slots = torch.tensor([1, 5, 17, 40, 41, 60])
        yield "kv_cache_write", (k, v, kc.clone(), vc.clone(), slots, a[12], a[13])
    for Q, temp in ((1, False), (2, True)):  # the fused decode path and the separate ops (on CPU both the latter)
        a = list(_qkv_attention_case(Q, [20, 29], 32, False, not temp, not temp, temp))
        a[10] = None if a[10] is None else list(a[10])  # the schema's float[]
        yield "qkv_attention", tuple(a)


@pytest.mark.parametrize("name,args", list(_cases()), ids=lambda c: c if isinstance(c, str) else "")
def test_opcheck(name, args):
    op = getattr(torch.ops.maverick, name)
    utils = ["test_faketensor", "test_autograd_registration"]
    # the schema check compares inputs before and after with ops that have no FP8 kernel on CPU
    if not any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args):
        utils.append("test_schema")
    torch.library.opcheck(op, args, test_utils=tuple(utils))
    if name == "kv_cache_write":
        ref = [t.clone() for t in args[2:4]]
        ops.kv_cache_write(args[0], args[1], ref[0], ref[1], *args[4:])
        got = [t.clone() for t in args[2:4]]
        op(args[0], args[1], got[0], got[1], *args[4:])
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, ref))
        return
    got, ref = op(*args), getattr(ops, name)(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), ref if isinstance(ref, tuple) else (ref,)):
        assert torch.equal(a, b)


def test_quantize_helper_is_what_the_fp8_op_sees():
    x = torch.tensor([[1.0, -448.0, 3.3]])
    assert torch.equal(quantize_fp8_static(x, torch.tensor(1.0)).float(), torch.tensor([[1.0, -448.0, 3.25]]))
