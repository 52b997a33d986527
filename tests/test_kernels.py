"""Triton kernels against their pure-torch references (the specification).

On CPU these run in the Triton interpreter (TRITON_INTERPRET=1, set in conftest when there is no GPU),
at small shapes. Its in-kernel FP8 downcast rounds some values one ulp off (Triton 3.7's interpreter), so FP8
cases there use a looser tolerance; on a GPU the same tests run with the tight one.
"""
import pytest
import torch

import maverick_plugins as ops
from maverick_plugins import dispatch

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
# relative L2 error allowed. fp32: summation order only. fp8: on a GPU the in-kernel quantization may
# round an element to the neighbouring e4m3 value where x / scale sits on a boundary; on CPU the inputs
# are made exactly representable (act() below) because the interpreter's FP8 downcast rounds wrongly.
TOL = {"fp32": 1e-5, "fp8": 1e-3}
ACT_SCALE = 2.0 ** -4  # a power of two: x / scale is exact


def act(*shape, scale=ACT_SCALE):
    """Activations. On CPU: e4m3 values times `scale` (each row reaching 448 * scale), so quantizing
    them in the interpreter involves no rounding; on a GPU: plain normal values."""
    if GPU:
        return torch.randn(*shape, device=DEV)
    f = torch.randn(*shape).mul(64).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    f[..., 0] = 448.0
    return f * scale


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rms_norm():
    from maverick_plugins.kernels.rms_norm import rms_norm_triton
    from maverick_plugins.kernels.small_ops import add_rms_norm_triton

    x, w = torch.randn(3, 80, device=DEV), torch.randn(80, device=DEV)
    assert rel(rms_norm_triton(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5)) < TOL["fp32"]


def _fp8_weight(n, k, rows=False):
    w = torch.randn(n, k, device=DEV)
    s = (w.abs().amax(1) / 448) if rows else (w.abs().max() / 448)
    return ((w / (s[:, None] if rows else s)).to(torch.float8_e4m3fn)), s.float()


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("m,rows,swiglu,split_k", [(1, False, False, 1), (3, True, False, 1), (5, True, True, 1),
                                                   (16, False, True, 1), (2, True, False, 3), (4, True, True, 2)])
def test_fp8_gemm_small_m(m, rows, swiglu, split_k, swap):
    """swap: y^T = W x^T (the weight tile on the MMA's M side), the same numbers."""
    from maverick_plugins.kernels.fp8_gemm import fp8_gemm_small_m

    torch.manual_seed(m)
    K, N = 96, 64
    w8, ws = _fp8_weight(N, K, rows)
    x = act(m, K)
    xs = torch.tensor(ACT_SCALE, device=DEV)
    out = fp8_gemm_small_m(x, w8, ws, xs, torch.float32, swiglu=swiglu, config=(16, 32, split_k, 4, 2, swap))
    ref = ops.fp8_linear_ref(x, w8, ws, xs, torch.float32)
    if swiglu:
        ref = ops.swiglu(ref)
    assert out.shape == ref.shape
    assert rel(out, ref) < TOL["fp8"]


@pytest.mark.parametrize("m,swiglu,split_k,rows", [(2, False, 3, True), (4, True, 2, True), (1, True, 4, False)])
def test_fp8_gemm_serial_split_k_equals_two_launches(m, swiglu, split_k, rows):
    """The last split of each column block reduces the partials itself: the same sums in the same order
    as the epilogue launch (bit-exact), arrival counters back at zero for the next call."""
    from maverick_plugins.kernels import fp8_gemm
    from maverick_plugins.kernels.counters import arrival_counters

    torch.manual_seed(10 + m)
    K, N = 96, 64
    w8, ws = _fp8_weight(N, K, rows)
    xs = torch.tensor(ACT_SCALE, device=DEV)
    cfg = (16, 32, split_k, 4, 2)
    for call in range(2):  # the second call finds the counters reset by the first
        x = act(m, K)
        # serial first: its partial buffer may be memory the previous call used, holding other inputs' sums
        one = fp8_gemm.fp8_gemm_small_m(x, w8, ws, xs, torch.float32, swiglu=swiglu, config=cfg, serial=True)
        two = fp8_gemm.fp8_gemm_small_m(x, w8, ws, xs, torch.float32, swiglu=swiglu, config=cfg, serial=False)
        assert torch.equal(one, two), call
        assert int(arrival_counters(x.device, 1, "fp8_gemm").abs().sum()) == 0
    ref = ops.fp8_linear_ref(x, w8, ws, xs, torch.float32)
    assert rel(one, ops.swiglu(ref) if swiglu else ref) < TOL["fp8"]


@pytest.mark.parametrize("m,n,k,rows,swiglu,block_n", [(1, 64, 96, False, False, 8), (1, 40, 640, True, False, 16),
                                                       (2, 48, 128, True, True, 4), (1, 64, 80, False, True, 2)])
def test_fp8_gemv(m, n, k, rows, swiglu, block_n):
    """The one-token GEMV (weights in registers) against the reference;
    K that is not a power of two (two pieces, the second masked), a partial last row block, e4m3
    subnormals, zeros and +-448 among the weights."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv

    torch.manual_seed(n + k)
    w8, ws = _fp8_weight(n, k, rows)
    special = torch.tensor([2 ** -9, -2 ** -9, 7 * 2 ** -9, 2 ** -6, -448.0, 448.0, 0.0])
    w8[:, :7] = special.to(device=DEV, dtype=torch.float8_e4m3fn)
    w8[::3, 7:] = (w8[::3, 7:].float() * 2 ** -12).to(torch.float8_e4m3fn)  # rows of subnormals mostly
    x = act(m, k)
    xs = torch.tensor(ACT_SCALE, device=DEV)
    out = fp8_gemv(x, w8, ws, xs, torch.float32, swiglu=swiglu, config=(block_n, 4))
    ref = ops.fp8_linear_ref(x, w8, ws, xs, torch.float32)
    if swiglu:
        ref = ops.swiglu(ref)
    assert out.shape == ref.shape
    assert rel(out, ref) < TOL["fp8"]
    if not swiglu:  # the rows of subnormals on their own (their outputs are 2^-12 of the others)
        assert rel(out[:, ::3], ref[:, ::3]) < TOL["fp8"]


@pytest.mark.parametrize("m,k,block_n", [(1, 96, 8), (2, 640, 16)])
def test_fp8_gemv_dynamic_activations(m, k, block_n):
    """input_scale None: each token quantized with its own amax / 448 inside the kernel (the FP8 lm_head),
    as quantize_fp8_dynamic_per_token does; tokens of very different magnitude."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv

    torch.manual_seed(k)
    w8, ws = _fp8_weight(40, k, rows=True)
    x = act(m, k) * torch.tensor([[1.0], [300.0]], device=DEV)[:m]
    out = fp8_gemv(x, w8, ws, None, torch.float32, config=(block_n, 4))
    assert rel(out, ops.fp8_linear_ref(x, w8, ws, None, torch.float32)) < TOL["fp8"]


def test_gemv_config_follows_the_measurements():
    """One token: every shape (tuned or default; K up to GEMV_MAX_K); two tokens: only the measured winners,
    never a SwiGLU shape; three or more: the split-K GEMM."""
    from maverick_plugins import dispatch

    t = dispatch.H200
    assert t.gemv_config(896, 5120, 1, False) == t.gemv[(896, 5120)]
    assert t.gemv_config(200, 96, 1, True) == dispatch.gemv_default(100, 96, True)
    assert t.gemv_config(64, dispatch.GEMV_MAX_K + 1, 1, False) is None
    assert t.gemv_config(896, 5120, 2, False) == t.gemv_2[(896, 5120)]
    assert t.gemv_config(4096, 5120, 2, True) is None
    assert t.gemv_config(200, 96, 2, False) is None
    assert t.gemv_config(896, 5120, 3, False) is None


def test_device_tables_cover_h100_h200_b200_and_pick_by_name(monkeypatch):
    """One table a device family, chosen by the device's name; others take the default; MoE configs by tokens."""
    from maverick_plugins import dispatch

    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA B200"):
        dispatch._table.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index, n=name: n)
        assert dispatch.table(torch.device("cuda", 0)).name == name[:11]
    dispatch._table.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
    assert dispatch.table(torch.device("cuda", 0)) is dispatch.DEFAULT
    dispatch._table.cache_clear()
    assert dispatch.table(torch.device("cpu")) is dispatch.DEFAULT
    t = dispatch.H200
    assert t.moe_config(1) == t.moe_config(2) == t.moe[2] and t.moe_config(3) == t.moe[3]
    assert t.moe_config(5) == t.moe_config(16) == t.moe[16]
    assert t.moe_config(64) == t.moe[16]  # beyond the table: its largest entry
    assert t.attention.splits(1, 1, 1024, 132) == 256 and t.attention.splits(8, 1, 1024, 132) == 66
    assert t.attention.splits(1, 1, 16, 132) == 16  # never more splits than table blocks


def moe_tol(channel: bool) -> float:
    """The MoE kernels' tolerance against their references. On CPU (Triton interpreter), measured in every MODE:
    static per-tensor scales 6e-8 to 1.1e-6 relative; per-channel weights with per-token activations 2.3e-2 to
    2.9e-2, because the interpreter's in-kernel fp8 downcast of the intermediate rounds wrongly (not the GPU's)."""
    if GPU:
        return TOL["fp8"] * 3
    return 4e-2 if channel else 1e-5


# (BLOCK_N, BLOCK_K, warps, stages, MODE[, SPLIT_K]): CUDA cores, mma.sync, wgmma, and pass 1 split over H
MOE_CONFIGS = {"cuda cores": (16, 32, 4, 2, 0), "mma.sync": (16, 32, 4, 2, 1), "wgmma": (64, 32, 4, 2, 2),
               "wgmma split-K": ((64, 32, 4, 2, 2, 2), (64, 32, 4, 2, 2)),
               "cuda cores split-K": ((16, 32, 4, 2, 0, 3), (16, 32, 4, 2, 0))}


@pytest.mark.parametrize("mode", list(MOE_CONFIGS))
@pytest.mark.parametrize("top_k,channel", [(1, False), (2, False), (1, True)])
def test_moe_gemv(top_k, channel, mode):
    """Routed experts alone (no shared expert) in every MODE, against moe_experts_ref."""
    from maverick_plugins.kernels.moe_gemv import moe_experts_gemv

    torch.manual_seed(top_k)
    T, H, I, E, offset = 3, 64, 32, 4, 2  # this rank holds experts 2..5 of 8
    x = act(T, H)
    logits = torch.randn(T, 8, device=DEV)
    vals, ids = logits.topk(top_k, dim=-1)
    scores = torch.sigmoid(vals) if GPU else torch.ones_like(vals)  # score * x must stay exact on CPU
    gu = torch.randn(E, 2 * I, H, device=DEV)
    dn = torch.randn(E, H, I, device=DEV)
    if channel:
        gs, ds = gu.abs().amax(-1) / 448, dn.abs().amax(-1) / 448  # [E, 2I], [E, H]
        gu8, dn8 = (gu / gs[..., None]).to(torch.float8_e4m3fn), (dn / ds[..., None]).to(torch.float8_e4m3fn)
        gis = dis = None
    else:
        gs, ds = gu.abs().max() / 448, dn.abs().max() / 448
        gu8, dn8 = (gu / gs).to(torch.float8_e4m3fn), (dn / ds).to(torch.float8_e4m3fn)
        gis = torch.tensor(ACT_SCALE, device=DEV)
        dis = torch.tensor(0.5 / 448, device=DEV)
    out = moe_experts_gemv(x, ids, scores, gu8, dn8, offset, gs, gis, ds, dis, config=MOE_CONFIGS[mode])
    ref = ops.moe_experts_ref(x, ids, scores, gu8, dn8, offset, gs, gis, ds, dis)
    assert ((ids >= offset) & (ids < offset + E)).any(), "test must route some tokens here"
    # the second GEMM quantizes the first one's output: boundary cases there are real on any device
    assert rel(out, ref) < moe_tol(channel)


@pytest.mark.parametrize("mode", list(MOE_CONFIGS))
@pytest.mark.parametrize("top_k,channel,Is", [(1, False, 32), (2, False, 48), (1, True, 16)])
def test_moe_ffn_with_shared_expert(top_k, channel, Is, mode):
    """Routed experts and the shared expert in the same two launches (shared intermediate Is may differ
    from the routed one, as with expert parallelism) against moe_ffn_ref."""
    from maverick_plugins.kernels.counters import arrival_counters
    from maverick_plugins.kernels.moe_gemv import moe_experts_gemv

    torch.manual_seed(10 + top_k)
    T, H, I, E, offset = 3, 64, 32, 4, 2
    x = act(T, H)
    vals, ids = torch.randn(T, 8, device=DEV).topk(top_k, dim=-1)
    scores = torch.sigmoid(vals) if GPU else torch.ones_like(vals)
    if channel:
        gs, ds = torch.rand(E, 2 * I, device=DEV) / 100 + 1e-3, torch.rand(E, H, device=DEV) / 100 + 1e-3
        gis = dis = None
    else:
        gs, ds = torch.tensor(1 / 200, device=DEV), torch.tensor(1 / 300, device=DEV)
        gis, dis = torch.tensor(ACT_SCALE, device=DEV), torch.tensor(0.5 / 448, device=DEV)
    w8 = lambda *s: (torch.randn(*s, device=DEV) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)  # noqa: E731
    gu8, dn8 = w8(E, 2 * I, H), w8(E, H, I)
    shared = (w8(2 * Is, H), torch.rand(2 * Is, device=DEV) / 100 + 1e-3, torch.tensor(ACT_SCALE, device=DEV),
              w8(H, Is), torch.tensor(1 / 250, device=DEV), torch.tensor(0.5 / 448, device=DEV))
    out = moe_experts_gemv(x, ids, scores, gu8, dn8, offset, gs, gis, ds, dis, shared=shared,
                           config=MOE_CONFIGS[mode])
    ref = ops.moe_ffn_ref(x, ids, scores, gu8, dn8, offset, gs, gis, ds, dis, *shared)
    shared_only = ops.moe_ffn_ref(x, ids, scores, gu8, dn8, 100, gs, gis, ds, dis, *shared)  # no local expert
    assert rel(ref, shared_only) > 0.05, "the routed part must matter in this case"
    assert rel(out, ref) < moe_tol(channel)
    if "split" in mode:  # the last split of each (row, column block) set its counter back: a second call agrees
        assert int(arrival_counters(x.device, 1, "moe_fc13").abs().sum()) == 0
        again = moe_experts_gemv(x, ids, scores, gu8, dn8, offset, gs, gis, ds, dis, shared=shared,
                                 config=MOE_CONFIGS[mode])
        assert torch.equal(out, again)


@pytest.mark.parametrize("mode", ["cuda cores", "wgmma split-K"])
def test_moe_pass_1_picks_the_expert_from_router_logits(mode):
    """router_logits: pass 1 takes each token's top-1 and its sigmoid score from the logits and leaves them in
    top_ids / top_scores for pass 2; the result is moe_ffn's with those."""
    from maverick_plugins.kernels.moe_gemv import moe_experts_gemv

    torch.manual_seed(21)
    T, H, I, E, offset, Is = 3, 64, 32, 4, 2, 32
    x = act(T, H)
    logits = -torch.rand(T, 8, device=DEV) - 0.5  # on CPU the best logit is 0: score 1/2 keeps score * x exact
    logits[torch.arange(T), torch.tensor([2, 5, 3])] = 0.0
    if GPU:
        logits = logits + torch.rand(T, 1, device=DEV)
    w8 = lambda *s: (torch.randn(*s, device=DEV) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)  # noqa: E731
    gs, ds = torch.tensor(1 / 200, device=DEV), torch.tensor(1 / 300, device=DEV)
    gis, dis = torch.tensor(ACT_SCALE, device=DEV), torch.tensor(0.5 / 448, device=DEV)
    gu8, dn8 = w8(E, 2 * I, H), w8(E, H, I)
    shared = (w8(2 * Is, H), torch.rand(2 * Is, device=DEV) / 100 + 1e-3, torch.tensor(ACT_SCALE, device=DEV),
              w8(H, Is), torch.tensor(1 / 250, device=DEV), torch.tensor(0.5 / 448, device=DEV))
    ids = torch.full((T, 1), -1, dtype=torch.int64, device=DEV)
    scores = torch.zeros(T, 1, device=DEV)
    out = moe_experts_gemv(x, ids, scores, gu8, dn8, offset, gs, gis, ds, dis, shared=shared,
                           config=MOE_CONFIGS[mode], router_logits=logits)
    vals, want = logits.topk(1, dim=-1)
    assert torch.equal(ids, want) and rel(scores, torch.sigmoid(vals)) < TOL["fp32"]
    ref = ops.moe_ffn_ref(x, want, torch.sigmoid(vals), gu8, dn8, offset, gs, gis, ds, dis, *shared)
    assert rel(out, ref) < moe_tol(False)


@pytest.mark.parametrize("config,what", [((16, 32, 4, 2, 2), "wgmma, BLOCK_N >= 64"), ((16, 16, 4, 2, 1), "BLOCK_K >= 32"),
                                         ((16, 32, 4, 2, 5), "MODE must be"),
                                         (((16, 32, 4), (16, 32, 4, 2, 0, 2)), "1 in pass 2")])
def test_moe_gemv_rejects_configs_it_cannot_run(config, what):
    from maverick_plugins.kernels.moe_gemv import moe_experts_gemv

    x = torch.zeros(1, 64, device=DEV)
    gu8, dn8 = torch.zeros(2, 64, 64, device=DEV).to(torch.float8_e4m3fn), torch.zeros(2, 64, 32, device=DEV).to(
        torch.float8_e4m3fn)
    s = torch.tensor(1.0, device=DEV)
    ids, sc = torch.zeros(1, 1, dtype=torch.int64, device=DEV), torch.ones(1, 1, device=DEV)
    with pytest.raises(ValueError, match=what):
        moe_experts_gemv(x, ids, sc, gu8, dn8, 0, s, s, s, s, config=config)


def _attention_case(B, Q, ctx, chunk, fp8, seed=0, table_tokens=0):
    """table_tokens: make the block table this long (a max_seq_len beyond the contexts)."""
    torch.manual_seed(seed)
    kvh, group, D, bs = 2, 3, 16, 16
    H = kvh * group
    nb = (max(max(ctx) + Q, table_tokens) + bs - 1) // bs
    if chunk is not None:  # local layers keep a ring of one chunk
        nb = min(nb, chunk // bs)
    blocks = B * nb
    dtype = torch.float8_e4m3fn if fp8 else torch.float32
    kc = torch.randn(blocks + 1, bs, kvh, D, device=DEV).to(dtype)
    vc = torch.randn(blocks + 1, bs, kvh, D, device=DEV).to(dtype)
    table = torch.randperm(blocks, device=DEV).view(B, nb)
    T = B * Q
    q = torch.randn(T, H, D, device=DEV)
    k, v = (act(T, kvh, D, scale=1 / 8), act(T, kvh, D, scale=1 / 8)) if fp8 else \
        (torch.randn(T, kvh, D, device=DEV), torch.randn(T, kvh, D, device=DEV))
    v = torch.cat([v, torch.zeros_like(v)], dim=-1)[..., :D]  # a strided view, as v is in the model
    q_index = torch.arange(T, device=DEV).view(B, Q)
    ctx_t = torch.tensor(ctx, device=DEV)
    q_pos = ctx_t[:, None] + torch.arange(Q, device=DEV)[None, :]
    t2p = torch.arange(T, device=DEV)
    ks = vs = torch.tensor(1.0 / 8, device=DEV) if fp8 else None
    return (q, k, v, kc, vc, table, ctx_t, q_index, q_pos, t2p, D ** -0.5, chunk, ks, vs)


@pytest.mark.parametrize("Q,chunk,fp8", [(1, None, False), (3, None, False), (1, 32, False), (4, 32, False),
                                         (2, None, True), (3, 32, True)])
def test_decode_attention(Q, chunk, fp8):
    from maverick_plugins.kernels.decode_attention import decode_attention

    args = _attention_case(2, Q, [20, 45], chunk, fp8)
    ref = ops.paged_attention_ref(*args)
    (q, k, v, kc, vc, table, ctx, qi, qp, t2p, sc, ch, ks, vs) = args
    out = decode_attention(q, k, v, kc, vc, table, ctx, qi, qp, sc, ch, ks, vs, num_splits=2)
    assert rel(out, ref) < (TOL["fp8"] if fp8 else TOL["fp32"])


@pytest.mark.parametrize("ctx,chunk,splits", [([3, 70], None, None), ([70, 0], None, 9), ([64, 95], 32, 3),
                                               ([32, 33], 32, 16)])
def test_decode_attention_splits_follow_the_context(ctx, chunk, splits, monkeypatch):
    """A table far longer than the contexts (max_seq_len 256): the split length adapts to each sequence's
    context on the device; more splits than blocks leave some idle; a local layer at a chunk boundary
    (ctx % C == 0) sees none of the ring. The merge takes head_dim in two slices."""
    from maverick_plugins.kernels import decode_attention as da

    monkeypatch.setattr(da, "MERGE_BLOCK_D", 8)  # head_dim 16: two slices
    monkeypatch.setattr(da, "MERGE_TILE", 64)  # 2 parts per merge step: several steps
    decode_attention = da.decode_attention

    args = _attention_case(2, 2, ctx, chunk, False, table_tokens=256)
    ref = ops.paged_attention_ref(*args)
    (q, k, v, kc, vc, table, ctx_t, qi, qp, t2p, sc, ch, ks, vs) = args
    out = decode_attention(q, k, v, kc, vc, table, ctx_t, qi, qp, sc, ch, ks, vs, num_splits=splits)
    assert rel(out, ref) < TOL["fp32"]


def test_decode_attention_padded_sequence_rows_are_not_written():
    from maverick_plugins.kernels.decode_attention import decode_attention

    args = list(_attention_case(2, 2, [20, 30], None, False))
    args[8] = args[8].clone()
    args[8][1, 1] = -1  # sequence 1 has only one new token this step; its second row is padding
    args[7] = args[7].clone()
    args[7][1, 1] = 0  # padding points at token 0, which must keep its own output
    ref = ops.paged_attention_ref(*args)
    (q, k, v, kc, vc, table, ctx, qi, qp, t2p, sc, ch, ks, vs) = args
    out = decode_attention(q, k, v, kc, vc, table, ctx, qi, qp, sc, ch, ks, vs)
    assert rel(out[:3], ref[:3]) < TOL["fp32"]


def _qkv_attention_case(Q, ctx, chunk, fp8, rope, qk_norm, temp, seed=0):
    """Arguments of qkv_attention: a raw QKV output, rope tables, the slots of this step's tokens."""
    q, k, v, kc, vc, table, ctx_t, qi, qp, t2p, sc, ch, ks, vs = _attention_case(len(ctx), Q, ctx, chunk, fp8, seed)
    T, H, D = q.shape
    kvh, bs = k.shape[1], kc.shape[1]
    qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=-1)
    pos = qp.reshape(-1)
    inv = 1.0 / (500000 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    cos, sin = ops.rope_cos_sin(pos, inv)
    ring = pos % chunk if chunk else pos  # local layers: slot p % C of the ring
    slots = table.repeat_interleave(Q, dim=0).gather(1, (ring // bs)[:, None])[:, 0] * bs + ring % bs
    return (qkv, cos, sin, pos, H, kvh, D, rope, qk_norm, 1e-5, (4.0, 0.1) if temp else None, kc, vc, slots, ks, vs,
            table, ctx_t, qi, qp, t2p, sc, ch)


@pytest.mark.parametrize("ctx,chunk,fp8,rope,qk_norm,temp", [
    ([20, 45], 32, False, True, True, False), ([31, 64], 32, True, True, True, False),  # ring end, chunk start
    ([20, 45], None, False, False, False, True), ([7, 50], None, True, False, False, True),
    ([33, 3], 32, True, True, False, False)])
def test_decode_attention_applies_qkv_post_and_writes_the_cache(ctx, chunk, fp8, rope, qk_norm, temp):
    """One new token a sequence: the kernel takes the raw QKV output and does what qkv_post, attention and
    the cache write do one after another (qkv_attention_ref)."""
    from maverick_plugins.kernels.decode_attention import decode_attention

    args = list(_qkv_attention_case(1, ctx, chunk, fp8, rope, qk_norm, temp))
    (qkv, cos, sin, pos, H, kvh, D, rope, qk_norm, eps, temperature, kc, vc, slots, ks, vs,
     table, ctx_t, qi, qp, t2p, sc, ch) = args
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref = ops.qkv_attention_ref(*args[:11], ref_kc, ref_vc, *args[13:])
    T = qkv.shape[0]
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, kvh * D, kvh * D], dim=-1))
    out = decode_attention(q, k, v, kc, vc, table, ctx_t, qi, qp, sc, ch, ks, vs, num_splits=2,
                           post=(cos, sin, rope, qk_norm, eps, temperature), slots=slots)
    assert rel(out, ref) < (TOL["fp8"] if fp8 else TOL["fp32"])
    before = _qkv_attention_case(1, ctx, chunk, fp8, rope, qk_norm, temp)[11]
    assert not torch.equal(kc.float(), before.float())  # the new keys went in
    for got, want in ((kc, ref_kc), (vc, ref_vc)):
        got, want = got.float(), want.float()
        if not fp8:
            assert rel(got, want) < TOL["fp32"]
            continue
        # e4m3 of k computed in two ways (fp32 sums in another order) may round one ulp (1/8) apart; the
        # interpreter's downcast also loses a rounding carry into the exponent (Triton 3.7's interpreter): half the value
        near = (got - want).abs() <= want.abs() / 8
        carry = (got * 2 == want) & (not GPU)
        assert bool((near | carry).all()), (got - want).abs().max()
        assert int((got != want).sum()) <= max(1, k.numel() // 20)  # of the k.numel() values written


@pytest.mark.parametrize("Q", [1, 3])
def test_qkv_attention_is_its_reference(Q):
    """The op (on CPU: qkv_post, attention, the cache write as separate ops; after attention at Q > 1)."""
    args = list(_qkv_attention_case(Q, [20, 29], 32, False, True, True, False))
    before = args[11].clone()
    ref_caches = [args[11].clone(), args[12].clone()]
    ref = ops.qkv_attention_ref(*args[:11], *ref_caches, *args[13:])
    out = ops.qkv_attention(*args)
    assert rel(out, ref) < TOL["fp32"]
    assert not torch.equal(args[11], before)
    # on CPU the same torch ops; on a GPU (Q = 1: the fused kernel) RoPE and the norm in another order
    assert rel(args[11], ref_caches[0]) < TOL["fp32"] and rel(args[12], ref_caches[1]) < TOL["fp32"]


@pytest.mark.parametrize("Q,ctx,chunk,fp8,block", [(20, [0, 0], None, False, 16), (20, [0, 13], 16, False, 16),
                                                    (37, [5, 40], 32, False, 16), (9, [0, 21], None, True, 16),
                                                    (33, [17, 0], 32, True, 32)])
def test_prefill_attention(Q, ctx, chunk, fp8, block):
    """Many new tokens per sequence: fresh prompts, chunked prefill over cached context, chunk
    boundaries inside the step (chunk 16/32 < Q + ctx), tiles smaller than Q, FP8 cache."""
    from maverick_plugins.kernels.prefill_attention import prefill_attention

    args = _attention_case(2, Q, ctx, chunk, fp8)
    ref = ops.paged_attention_ref(*args)
    (q, k, v, kc, vc, table, ctx_t, qi, qp, t2p, sc, ch, ks, vs) = args
    out = prefill_attention(q, k, v, kc, vc, table, ctx_t, qi, qp, sc, ch, ks, vs, block_m=block, block_n=block)
    assert rel(out, ref) < (TOL["fp8"] if fp8 else TOL["fp32"])


def test_prefill_attention_padding_rows_are_not_written():
    from maverick_plugins.kernels.prefill_attention import prefill_attention

    args = list(_attention_case(2, 18, [0, 4], 16, False))
    args[8] = args[8].clone()
    args[8][1, 15:] = -1  # sequence 1 has 15 new tokens; its last 3 rows are padding ...
    args[7] = args[7].clone()
    args[7][1, 15:] = 0  # ... pointing at token 0, which must keep its own output
    ref = ops.paged_attention_ref(*args)
    (q, k, v, kc, vc, table, ctx_t, qi, qp, t2p, sc, ch, ks, vs) = args
    out = prefill_attention(q, k, v, kc, vc, table, ctx_t, qi, qp, sc, ch, ks, vs, block_m=16, block_n=16)
    keep = torch.cat([torch.arange(18), torch.arange(18, 33)])
    assert rel(out[keep], ref[keep]) < TOL["fp32"]


def test_add_rms_norm():
    from maverick_plugins.kernels.small_ops import add_rms_norm_triton

    x, d, w = torch.randn(3, 80, device=DEV), torch.randn(3, 80, device=DEV), torch.randn(80, device=DEV)
    h, y = add_rms_norm_triton(x, d, w, 1e-5)
    hr, yr = ops.add_rms_norm_ref(x, d, w, 1e-5)
    assert rel(h, hr) < TOL["fp32"] and rel(y, yr) < TOL["fp32"]


@pytest.mark.parametrize("rope,qk_norm,temp", [(True, False, False), (True, True, False), (False, False, True)])
def test_qkv_post(rope, qk_norm, temp):
    from maverick_plugins.kernels.small_ops import qkv_post_triton

    T, H, KVH, D = 5, 4, 2, 16
    qkv = torch.randn(T, (H + 2 * KVH) * D, device=DEV)
    pos = torch.tensor([0, 3, 7, 40, 1000], device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    cos, sin = ops.rope_cos_sin(pos, inv)
    args = (qkv, cos, sin, pos, H, KVH, D, rope, qk_norm, 1e-5, (4.0, 0.1) if temp else None)
    for got, ref in zip(qkv_post_triton(*args), ops.qkv_post_ref(*args)):
        assert rel(got, ref) < TOL["fp32"]


@pytest.mark.parametrize("rope,fp8", [(True, False), (True, True), (False, True)])
def test_qkv_post_writes_the_kv_cache(rope, fp8):
    """With a cache, qkv_post also writes k and v to their slots, exactly as kv_cache_write would (bytes)."""
    from maverick_plugins.kernels.small_ops import kv_write_triton, qkv_post_triton

    T, H, KVH, D = 3, 4, 2, 16
    qkv = act(T, (H + 2 * KVH) * D, scale=2.0 ** -6)  # k / k_scale exact in the interpreter's FP8 cast
    pos = torch.tensor([5, 9, 33], device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    cos, sin = ops.rope_cos_sin(pos, inv)
    dt = torch.float8_e4m3fn if fp8 else torch.float32
    ks, vs = (torch.tensor(2.0 ** -6, device=DEV), torch.tensor(2.0 ** -6, device=DEV)) if fp8 else (None, None)
    caches = [torch.zeros(4, 8, KVH, D, device=DEV, dtype=dt) for _ in range(4)]
    slots = torch.tensor([1, 17, 30], device=DEV)
    args = (qkv, cos, sin, pos, H, KVH, D, rope, False, 1e-5, None)
    q, k, v = qkv_post_triton(*args, cache=(caches[0], caches[1], slots, ks, vs))
    qr, kr, vr = ops.qkv_post_ref(*args)
    assert rel(q, qr) < TOL["fp32"] and rel(k, kr) < TOL["fp32"] and torch.equal(v, vr)
    # byte for byte what the separate cache-write kernel (tested against its reference) makes of this k, v
    kv_write_triton(k, v, caches[2], caches[3], slots, ks, vs)
    view = (lambda c: c.view(torch.uint8)) if fp8 else (lambda c: c)
    assert view(caches[0]).count_nonzero() > 0 and view(caches[1]).count_nonzero() > 0
    assert torch.equal(view(caches[0]), view(caches[2])) and torch.equal(view(caches[1]), view(caches[3]))


@pytest.mark.parametrize("fp8", [False, True])
def test_kv_write(fp8):
    from maverick_plugins.kernels.small_ops import kv_write_triton

    dt = torch.float8_e4m3fn if fp8 else torch.float32
    caches = [torch.zeros(4, 8, 2, 16, device=DEV, dtype=dt) for _ in range(4)]
    k = act(3, 2, 16, scale=1 / 8) if fp8 else torch.randn(3, 2, 16, device=DEV)
    v = torch.cat([k, k], dim=-1)[..., :16] * 2  # strided like the model's v
    slots = torch.tensor([0, 9, 31], device=DEV)
    s = torch.tensor(1 / 8, device=DEV)
    kv_write_triton(k, v, caches[0], caches[1], slots, s, s)
    with dispatch.use(dispatch.KernelOptions(enabled=False)):
        ops.kv_cache_write(k, v, caches[2], caches[3], slots, s, s)
    assert torch.equal(caches[0].view(torch.uint8) if fp8 else caches[0], caches[2].view(torch.uint8) if fp8 else caches[2])
    assert torch.equal(caches[1].view(torch.uint8) if fp8 else caches[1], caches[3].view(torch.uint8) if fp8 else caches[3])


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_topk(top_k):
    from maverick_plugins.kernels.small_ops import router_topk_triton

    logits = torch.randn(5, 128, device=DEV)
    ids, scores = router_topk_triton(logits, top_k)
    vals, ref_ids = logits.topk(top_k, dim=-1)
    assert torch.equal(ids, ref_ids)
    assert rel(scores, torch.sigmoid(vals)) < TOL["fp32"]


@pytest.mark.parametrize("T,E,top_k", [(1, 128, 1), (5, 16, 2), (3, 20, 1)])
@pytest.mark.parametrize("preload", [False, True])
def test_router_gemv_and_top_k_in_one_launch(T, E, top_k, preload):
    """The fused router (GEMV by many programs, top-k by the last to arrive) against the reference: the same
    experts and scores; called twice, so the arrival counter must have been reset by the first call. With
    preload each program holds its whole weight rows (loaded before it waits for x)."""
    from maverick_plugins.kernels.small_ops import router_triton

    torch.manual_seed(T)
    x, w = torch.randn(T, 96, device=DEV), torch.randn(E, 96, device=DEV)
    for _ in range(2):
        ids, scores = router_triton(x, w, top_k, block_k=32, preload=preload)
        logits = x @ w.t()
        vals, ref_ids = logits.topk(top_k, dim=-1)
        assert torch.equal(ids, ref_ids)
        assert rel(scores, torch.sigmoid(vals)) < TOL["fp32"]


@pytest.mark.parametrize("T,rows,start", [(1, 40, 0), (7, 40, 40), (300, 24, 16)])
def test_embedding_rows(T, rows, start):
    """The rank's rows of the vocabulary-parallel embedding: exact copies for ids it holds, zeros for the
    others (ids below and above its slice); hidden not a multiple of the kernel's block."""
    from maverick_plugins.kernels.step_start import embedding_rows_triton

    torch.manual_seed(T)
    weight = torch.randn(rows, 1100, device=DEV).to(torch.bfloat16)
    ids = torch.randint(0, 3 * rows, (T,), device=DEV)
    ids[0] = start  # at least one held id
    got = embedding_rows_triton(ids, weight, start)
    assert torch.equal(got, ops.embedding_rows_ref(ids, weight, start))
    assert (got[0] == weight[0]).all()


def test_embedding_rows_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"expected ids \[T\] and weight \[rows, hidden\]"):
        ops.embedding_rows(torch.zeros(2, 3, dtype=torch.long), torch.zeros(8, 4), 0)


@pytest.mark.parametrize("T", [1, 5, 130])
def test_rope_cos_sin_kernel(T):
    """cos / sin of position * inv_freq (fp32) as torch computes them, positions up to 1M and -1 (graph padding)."""
    from maverick_plugins.kernels.step_start import rope_cos_sin_triton

    torch.manual_seed(T)
    pos = torch.randint(-1, 1 << 20, (T,), device=DEV)
    inv = 1.0 / 500000 ** (torch.arange(0, 128, 2, device=DEV).float() / 128)
    cos, sin = rope_cos_sin_triton(pos, inv)
    ref_cos, ref_sin = ops.rope_cos_sin_ref(pos, inv)
    assert cos.shape == ref_cos.shape == (T, 64) and cos.dtype == torch.float32
    assert (cos - ref_cos).abs().max().item() < 1e-6 and (sin - ref_sin).abs().max().item() < 1e-6


def test_gemv_chain_in_one_persistent_launch():
    """A chain of FP8 GEMVs as one launch, each program running its share of the tiles in order, each tile
    waiting on its input stage's counter: the same bits as the chain of fp8_gemv launches (the same arithmetic: every
    stage's K not a power of two or a partial last tile somewhere), the first stage as fp8_linear_ref,
    called twice (the counters come back to zero), and shapes that do not chain refused."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import gemv_chain_ref

    torch.manual_seed(7)
    dims = [96, 40, 72, 33, 64]
    stages = []
    for k, n in zip(dims, dims[1:]):
        w8, ws = _fp8_weight(n, k, rows=True)
        stages.append((w8, ws, torch.tensor(2.0 ** -3, device=DEV)))
    chain = GemvChain(stages, rows=4)
    for call in range(2):
        x = act(1, dims[0]).to(torch.bfloat16)
        got = chain(x).clone()
        want = x
        for w8, ws, xs in stages:
            want = fp8_gemv(want, w8, ws, xs, torch.bfloat16, config=(4, 4))
        if GPU:  # the sums' order may differ between the two kernels' layouts
            assert rel(got, want.reshape(-1)) < 1e-2, call
        else:
            assert torch.equal(got, want.reshape(-1)), call
        assert rel(got, gemv_chain_ref(x, stages)[-1]) < (2e-2 if GPU else 0.2), call
        assert int(chain.counters.abs().sum()) == 0, call
    one = GemvChain(stages[:1], rows=8)(x).float()
    assert rel(one, ops.fp8_linear_ref(x, *stages[0], torch.bfloat16).reshape(-1)) < 1e-2
    with pytest.raises(ValueError, match=r"programs=100000: expected 1\.\.\d+ \(one an SM"):
        GemvChain(stages, programs=100_000)  # tiles wait on each other: more programs than run at once hang
    with pytest.raises(ValueError, match=r"stage 1: K=40 but its input \(stage 0\) has 33 elements"):
        GemvChain([stages[2], stages[1]])
    with pytest.raises(ValueError, match=r"inputs have \[96\] elements"):
        chain(torch.zeros(95, device=DEV))


def test_gemv_chain_narrow_stages_take_more_rows():
    """A stage with K at most half (a quarter) of the chain's widest takes tiles of twice (four times) the rows
    and half (a quarter) the columns: the same bits as the fp8_gemv launches in the interpreter, a SwiGLU
    stage, K not a multiple of 16 and partial last tiles included."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv
    from maverick_plugins.kernels.persistent_chain import WIDE, GemvChain
    from maverick_plugins.persistent import ChainStage

    torch.manual_seed(11)
    xs = torch.tensor(2.0 ** -3, device=DEV)
    shapes = [(128, 256, False), (80, 128, True), (64, 40, False), (256, 64, False)]  # (rows, K, SwiGLU)
    stages = [ChainStage(*_fp8_weight(n, k, rows=True), xs, swiglu=sw) for n, k, sw in shapes]
    chain = GemvChain(stages, rows=4)
    assert chain.desc[:, WIDE.value].tolist() == [0, 1, 2, 2]
    x = act(1, 256).to(torch.bfloat16)
    got = chain(x)
    want = x
    for st in stages:
        want = fp8_gemv(want, st.weight, st.row_scales, xs, torch.bfloat16, swiglu=st.swiglu, config=(4, 4))
    if GPU:  # the sums' order may differ between the two kernels' layouts
        assert rel(got, want.reshape(-1)) < 1e-2
    else:
        assert torch.equal(got, want.reshape(-1))


def test_gemv_chain_products_on_tensor_cores():
    """dot=True: each tile's products as a matrix product on tensor cores (the K columns cut into 16 slices, the
    diagonal blocks summed), at every tile shape (K=5120 in two pieces, K=1536 at twice the rows, K=64 at four
    times): the same output as the FMA path (in the interpreter, bit for bit; on a GPU within the sums'
    order); chains too narrow for it refused."""
    from maverick_plugins.kernels.persistent_chain import WIDE, GemvChain
    from maverick_plugins.persistent import ChainStage

    torch.manual_seed(13)
    xs = torch.tensor(2.0 ** -5, device=DEV)
    stages = [ChainStage(*_fp8_weight(n, k, rows=True), xs) for n, k in ((1536, 5120), (64, 1536), (96, 64))]
    fma, dot = GemvChain(stages, rows=4), GemvChain(stages, rows=4, dot=True)
    assert dot.desc[:, WIDE.value].tolist() == [0, 1, 2]
    x = act(1, 5120).to(torch.bfloat16)
    want, got = fma(x).float().clone(), dot(x).float()
    if GPU:
        assert rel(got, want) < 1e-2
    else:
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"dot=True: the tile widths \(K pieces 64 \+ 32\) must be at least 512"):
        GemvChain([ChainStage(*_fp8_weight(8, 96, rows=True), xs)], dot=True)


def test_dense_mlp_blocks_in_one_persistent_launch():
    """Two dense MLP blocks (RMSNorm, fc13 + SwiGLU, fc2, residual add) as four stages of one launch, called
    three times: close to gemv_chain_ref, the MLPs' part of the output (out - x) too; on a GPU also close to
    the launches a layer runs (rms_norm, fp8_gemv with SwiGLU, fp8_gemv, add_rms_norm). On CPU the bounds
    are loose: the interpreter rounds to e4m3 and bf16 its own way (a chain with the gate and up rows
    swapped is off by 1.7 in the MLPs' part). Stages that cannot be built are refused, naming stage and
    field."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage, gemv_chain_ref

    torch.manual_seed(3)
    H, I, eps = 64, 48, 1e-5
    blocks = []
    for _ in range(2):  # weights of unit-variance outputs, as a trained model's
        w13, s13 = _fp8_weight(2 * I, H, rows=True)
        w2, s2 = _fp8_weight(H, I, rows=True)
        g = (1 + 0.1 * torch.randn(H, device=DEV)).to(torch.bfloat16)
        blocks.append((w13, s13 / H ** 0.5, w2, s2 / I ** 0.5, g))
    xs = torch.tensor(2.0 ** -6, device=DEV)
    stages = []
    for b, (w13, s13, w2, s2, g) in enumerate(blocks):
        stages += [ChainStage(w13, s13, xs, swiglu=True, norm_weight=g),
                   ChainStage(w2, s2, xs, residual_from=2 * b - 1)]
    chain = GemvChain(stages, rows=4, eps=eps)
    for call in range(3):
        h = act(1, H).to(torch.bfloat16)
        got = chain(h).clone().float()
        ref = gemv_chain_ref(h, stages, eps)[-1].float()
        assert rel(got, ref) < (1e-2 if GPU else 0.1), call
        assert rel(got - h.float(), ref - h.float()) < (3e-2 if GPU else 0.5), call
        assert int(chain.counters.abs().sum()) == 0, call
        if GPU:
            want, normed = h, ops.rms_norm(h, blocks[0][4], eps)
            for b, (w13, s13, w2, s2, _) in enumerate(blocks):
                a = fp8_gemv(normed, w13, s13, xs, torch.bfloat16, swiglu=True)
                want, normed = ops.add_rms_norm(want, fp8_gemv(a, w2, s2, xs, torch.bfloat16),
                                                blocks[(b + 1) % 2][4], eps)
            assert rel(got, want.reshape(-1)) < 1e-2, call
    w13, s13, w2, s2, g = blocks[0]
    with pytest.raises(ValueError, match="stage 1: residual_from=1: expected an earlier stage"):
        GemvChain([stages[0], ChainStage(w2, s2, xs, residual_from=1)])
    with pytest.raises(ValueError, match="stage 0: norm weight of 63 elements for K=64"):
        GemvChain([ChainStage(w13, s13, xs, swiglu=True, norm_weight=g[:63])])
    with pytest.raises(ValueError, match="stage 0: a SwiGLU weight stacks gate and up rows, got an odd 95"):
        GemvChain([ChainStage(w13[:95], s13[:95], xs, swiglu=True)])
    with pytest.raises(ValueError, match="stage 1: residual from stage -1 has 64 elements, the output 48"):
        GemvChain([ChainStage(w13, s13, xs, swiglu=True), ChainStage(w2[:I], s2[:I], xs, residual_from=-1)])


def _moe_stages(H, Is, Ir, E, xs, dev, first=0):
    """Stages of one MoE block of a Llama 4 decoder layer from stage `first` on (its input: stage first - 1's
    output): router, shared fc13, routed fc13 (the pick's expert, input times its score), shared fc2 with
    the residual, routed fc2 added to that. Weights of unit-variance outputs."""
    from maverick_plugins.persistent import ChainStage

    def fp8(*shape):
        w = torch.randn(*shape, device=dev)
        s = w.abs().amax(-1) / 448
        return (w / s[..., None]).to(torch.float8_e4m3fn), (s / shape[-1] ** 0.5).float()

    g = (1 + 0.1 * torch.randn(H, device=dev)).to(torch.bfloat16)
    router = (torch.randn(E, H, device=dev) / H ** 0.5).to(torch.bfloat16)
    (s13, s13s), (r13, r13s) = fp8(2 * Is, H), fp8(E, 2 * Ir, H)
    (s2, s2s), (r2, r2s) = fp8(H, Is), fp8(E, H, Ir)
    f = first
    return [ChainStage(router, None, None, norm_weight=g, router=True),
            ChainStage(s13, s13s, xs, swiglu=True, norm_weight=g, input_from=f - 1),
            ChainStage(r13, r13s, xs, swiglu=True, norm_weight=g, input_from=f - 1, experts_from=f, scored=True),
            ChainStage(s2, s2s, xs, input_from=f + 1, residual_from=f - 1),
            ChainStage(r2, r2s, xs, input_from=f + 2, residual_from=f + 3, experts_from=f)]


def test_moe_block_in_one_persistent_launch():
    """A MoE block (router, shared and routed fc13 + SwiGLU, both fc2s, the residual) then a dense MLP block
    as one launch: the tiles pick the expert from the router stage's logits in the kernel, so inputs routed to
    different experts give each expert's output. Each stage close to gemv_chain_ref's, the same pick where the
    top two logits are 0.05 apart, the counters back at zero, and MoE stages that cannot be built refused."""
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage, gemv_chain_ref

    torch.manual_seed(11)
    H, Is, Ir, E, I, eps = 64, 16, 32, 4, 48, 1e-5
    xs = torch.tensor(2.0 ** -6, device=DEV)
    stages = _moe_stages(H, Is, Ir, E, xs, DEV)
    w13, s13 = _fp8_weight(2 * I, H, rows=True)
    w2, s2 = _fp8_weight(H, I, rows=True)
    g = (1 + 0.1 * torch.randn(H, device=DEV)).to(torch.bfloat16)
    stages += [ChainStage(w13, s13 / H ** 0.5, xs, swiglu=True, norm_weight=g),
               ChainStage(w2, s2 / I ** 0.5, xs, residual_from=4)]
    chain = GemvChain(stages, rows=4, eps=eps)
    picks = set()
    for call in range(6):
        h = act(1, H).to(torch.bfloat16)
        got = chain(h).clone().float()
        ref = gemv_chain_ref(h, stages, eps)
        logits = chain.output(0).float()
        assert rel(logits, ref[0]) < (1e-2 if GPU else 5e-2), call  # CPU: the interpreter rounds the norm down
        pick = int(ref[0].float().argmax())
        if sorted(ref[0].float())[-2] < ref[0].float().max() - 0.05:  # no near tie: both must pick it
            assert int(logits.argmax()) == pick, call
            picks.add(pick)
            # the routed SwiGLU: on CPU within 0.28 of the reference in these calls, 1.1-1.7 off another
            # expert's (the interpreter's e4m3 rounding); the residual stages within 0.04
            assert rel(chain.output(2), ref[2]) < (5e-2 if GPU else 0.6), call
            for i in (3, 4, 6):
                assert rel(chain.output(i), ref[i]) < (2e-2 if GPU else 0.1), (call, i)
        assert rel(got, ref[-1].float()) < (1e-2 if GPU else 0.1), call
        assert int(chain.counters.abs().sum()) == 0, call
    assert len(picks) >= 2, picks  # the tiles followed the pick, not one expert
    router, r13 = stages[0], stages[2]
    with pytest.raises(ValueError, match="stage 1: experts_from=0: expected an earlier router stage with 4 logits"):
        GemvChain([stages[1]._replace(input_from=-1), r13._replace(experts_from=0, input_from=-1)])
    with pytest.raises(ValueError, match=r"stage 0: expected an e4m3 weight \[E, N, K\] with \[E, N\] row scales"):
        GemvChain([router, r13._replace(row_scales=r13.row_scales[0], input_from=-1, experts_from=0)][1:])
    with pytest.raises(ValueError, match="stage 0: a router takes a bf16 weight"):
        GemvChain([router._replace(weight=router.weight.float())])
    with pytest.raises(ValueError, match="stage 1: scored needs experts_from"):
        GemvChain([router, stages[1]._replace(scored=True)])


def test_decoder_layer_tail_with_two_inputs_in_one_persistent_launch():
    """A decoder layer after its attention kernel as one launch with two inputs, the attention output and
    the residual stream: o_proj plus the residual, the dense MLP block, then the next layer's qkv from the
    normed stream (what a layer would launch after attention). Close to gemv_chain_ref, which takes both
    inputs; inputs of the wrong size or count refused."""
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage, gemv_chain_ref

    torch.manual_seed(5)
    H, A, I, Q, eps = 64, 32, 48, 80, 1e-5
    xs = torch.tensor(2.0 ** -6, device=DEV)
    w = {name: _fp8_weight(n, k, rows=True) for name, n, k in
         (("o", H, A), ("fc13", 2 * I, H), ("fc2", H, I), ("qkv", Q, H))}
    w = {name: (w8, s / w8.shape[1] ** 0.5) for name, (w8, s) in w.items()}
    # the MLP moves the stream: the qkv of h instead of h + mlp is 0.25-0.7 off
    w["fc2"] = (w["fc2"][0], w["fc2"][1] * 8)
    g1, g2 = ((1 + 0.1 * torch.randn(H, device=DEV)).to(torch.bfloat16) for _ in range(2))
    stages = [ChainStage(*w["o"], xs, input_from=-1, residual_from=-2),
              ChainStage(*w["fc13"], xs, swiglu=True, norm_weight=g1),
              ChainStage(*w["fc2"], xs, residual_from=0),
              ChainStage(*w["qkv"], xs, norm_weight=g2)]
    chain = GemvChain(stages, rows=4, eps=eps, inputs=(A, H))
    for call in range(2):
        o, x = act(1, A).to(torch.bfloat16), act(1, H).to(torch.bfloat16)
        got = chain(o, x).clone()
        ref = gemv_chain_ref((o, x), stages, eps)
        assert rel(chain.output(0), ref[0]) < (1e-2 if GPU else 0.05), call
        assert rel(chain.output(2), ref[2]) < (1e-2 if GPU else 0.1), call
        assert rel(got, ref[3]) < (2e-2 if GPU else 0.15), call
        assert int(chain.counters.abs().sum()) == 0, call
    with pytest.raises(ValueError, match=r"inputs have \[32, 64\] elements, got \[\[1, 32\]\]"):
        chain(o)
    with pytest.raises(ValueError, match=r"stage 0: input_from=-3: expected an earlier stage or one of the 2"):
        GemvChain([stages[0]._replace(input_from=-3)], inputs=(A, H))
    with pytest.raises(ValueError, match=r"stage 0: K=32 but its input \(stage -2\) has 64 elements"):
        GemvChain([stages[0]._replace(input_from=-2)], inputs=(A, H))
