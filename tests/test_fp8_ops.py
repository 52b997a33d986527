"""The FP8 reference ops: the specification every FP8 GPU kernel is tested against."""
import pytest
import torch

import maverick_plugins as ops


def test_quantize_static_rounds_and_saturates():
    scale = torch.tensor(0.5)
    x = torch.tensor([0.0, 1.0, -3.3, 1000.0, -1000.0, 0.26])
    q = ops.quantize_fp8_static(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    back = ops.dequantize_fp8(q, scale)
    assert back[3] == 448 * 0.5 and back[4] == -448 * 0.5  # saturated, never inf/nan
    assert back[1] == 1.0
    assert torch.allclose(back[:3], x[:3], rtol=2 ** -3)


def test_fp8_linear_is_exact_product_of_dequantized_values():
    torch.manual_seed(0)
    x, w = torch.randn(7, 64), torch.randn(48, 64)
    ws, xs = w.abs().max() / 448, x.abs().max() / 448
    w8 = ops.quantize_fp8_static(w, ws)
    y = ops.fp8_linear(x, w8, ws, xs, torch.float32)
    ref = ops.dequantize_fp8(ops.quantize_fp8_static(x, xs), xs).double() @ ops.dequantize_fp8(w8, ws).double().t()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
    # against the unquantized product: FP8 error, a few percent
    assert ((y - x @ w.t()).norm() / (x @ w.t()).norm()).item() < 0.08


def test_fp8_linear_per_channel_dynamic():
    torch.manual_seed(1)
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    ws = w.abs().amax(1, keepdim=True) / 448
    w8 = (w / ws).to(torch.float8_e4m3fn)
    y = ops.fp8_linear(x, w8, ws, None, torch.float32)
    x8, xs = ops.quantize_fp8_dynamic_per_token(x)
    ref = (x8.float() * xs) @ (w8.float() * ws).t()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_fp8_kv_write_read_roundtrip():
    torch.manual_seed(2)
    k_cache = torch.zeros(3, 4, 2, 8, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    ks, vs = k.abs().max() / 448, v.abs().max() / 448
    slots = torch.tensor([0, 1, 5, 6, 11])
    ops.kv_cache_write(k, v, k_cache, v_cache, slots, ks, vs)
    got = k_cache.view(-1, 2, 8)[slots].float() * ks
    assert torch.allclose(got, k, rtol=2 ** -3, atol=ks.item())
    assert torch.equal(k_cache.view(-1, 2, 8)[slots], ops.quantize_fp8_static(k, ks))


def test_grouped_moe_equals_reference():
    """The prefill MoE (each expert on its own tokens) computes exactly what the dense reference does."""
    torch.manual_seed(3)
    T, H, I, E = 40, 64, 32, 4
    x = torch.randn(T, H)
    vals, ids = torch.randn(T, 8).topk(2, dim=-1)  # 8 experts in all, this rank holds 2..5
    scores = torch.sigmoid(vals)
    gu, dn = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    gs, ds = gu.abs().max() / 448, dn.abs().max() / 448
    gu8, dn8 = (gu / gs).to(torch.float8_e4m3fn), (dn / ds).to(torch.float8_e4m3fn)
    xs = torch.tensor(4 / 448)
    args = (x, ids, scores, gu8, dn8, 2, gs, xs, ds, torch.tensor(1 / 448))
    ref, got = ops.moe_experts_ref(*args), ops.moe_experts_grouped(*args)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6
    bf = (x, ids, scores, gu, dn, 2)  # unquantized experts too
    assert ((ops.moe_experts_grouped(*bf) - ops.moe_experts_ref(*bf)).norm() / ops.moe_experts_ref(*bf).norm()) < 1e-6


@pytest.mark.parametrize("env,on", [(None, True), ("on", True), ("late", True), ("off", False), ("0", False)])
def test_pdl_comes_from_the_environment_on_by_default(env, on, monkeypatch):
    """Programmatic dependent launch: MAVERICK_PDL (default on) reaches the kernels through the runner's
    KernelOptions, read at each launch (so one process can switch); off where the GPU predates Hopper, and a
    typo is an error naming the choices."""
    from maverick_plugins import dispatch
    from maverick_plugins.kernels.pdl import pdl_launch

    from maverick import envs

    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    if env is None:
        monkeypatch.delenv("MAVERICK_PDL", raising=False)
    else:
        monkeypatch.setenv("MAVERICK_PDL", env)
    cuda = torch.device("cuda", 0)
    with dispatch.use(dispatch.KernelOptions(pdl=envs.pdl())):
        assert pdl_launch(cuda) == ({"PDL": True, "launch_pdl": True} if on else {"PDL": False})
        assert pdl_launch(torch.device("cpu")) == {"PDL": False}
        with dispatch.use(dispatch.KernelOptions(pdl=not on)):  # switched inside one process
            assert pdl_launch(cuda)["PDL"] is (not on)
    monkeypatch.setattr(dispatch, "_capability", lambda index: (8, 0))  # Ampere: no PDL
    assert pdl_launch(cuda) == {"PDL": False}
    monkeypatch.setenv("MAVERICK_PDL", "late2")
    with pytest.raises(ValueError, match="MAVERICK_PDL='late2': expected 'on' or 'off'"):
        envs.pdl()


def test_kernel_options_switch_the_reference_path_per_forward():
    """KernelOptions(enabled=False) makes every op take its reference inside `use`, and only there."""
    from maverick_plugins import dispatch

    x = torch.zeros(2, 4, device="meta")
    assert dispatch.options().enabled
    with dispatch.use(dispatch.KernelOptions(enabled=False)):
        assert not dispatch.options().enabled
    assert dispatch.options() == dispatch.KernelOptions()
    assert not dispatch.active(x)  # never a kernel off CUDA
