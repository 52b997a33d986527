"""FP8 GEMV for a decode token or two: each program holds its weight rows in registers, requested before it waits.

At one token a GEMM is a weight stream and the fixed cost of a kernel (launch, first DRAM latency, the
split-K reduction's round trip through L2) is most of its time: qkv (4.6 MB) took 5.8 us in a chain where
a plain read of the same bytes takes 2.8. Here each program loads its BLOCK_N whole weight rows (all of K)
into registers with one load per K piece, before the PDL wait (weights depend on no earlier kernel), so
the whole matrix is in flight while the previous kernel finishes; then it releases the next kernel (whose
programs use no shared memory either and fit beside this one's on the SMs) and only then reads x. No
split-K, no cross-program reduction: a row's dot product is a sum inside one program.

The dot runs on CUDA cores (e4m3 -> f16 -> f32, exact products, fp32 sums). The largest shape stays
below a plain read (dense fc13 + SwiGLU, 21 MB: 2.5 TB/s on H200), and not for the conversions alone:
building the f32 bits from the e4m3 bits with integer ops (per element, or packed in inline PTX) measured
slower, and a pre-quantized FP8 input gained 11% (benchmarks/HISTORY.md).
K = KA + KB: KA the largest power of two <= K, KB the rest rounded up to a power of two (masked), since
Triton tiles have power-of-two sizes (5120 = 4096 + 1024, 640 = 512 + 128).
"""
import torch
import triton
import triton.language as tl

from ..dispatch import GEMV_MAX_K, table
from .e4m3 import to_e4m3
from .pdl import pdl_enter, pdl_launch, pdl_release


@triton.jit
def _quantized(x, x_scale):
    """x8 = saturate(x / x_scale) in e4m3, as f32 (exact)."""
    return to_e4m3(x, x_scale).to(tl.float32)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, out_ptr,
    M, N_OUT, K, stride_xm, stride_wn, stride_om,
    ROW_SCALES: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
    DYNAMIC_X: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    rows = offs_n.to(tl.int64) * stride_wn
    up_rows = (offs_n + N_OUT).to(tl.int64) * stride_wn
    ka = tl.arange(0, KA)
    # every weight byte of this program requested before the wait
    wa = tl.load(w_ptr + rows[:, None] + ka[None, :], mask=n_mask[:, None], other=0.0)
    if SWIGLU:
        ua = tl.load(w_ptr + up_rows[:, None] + ka[None, :], mask=n_mask[:, None], other=0.0)
    if KB > 0:
        kb = KA + tl.arange(0, KB)
        b_mask = n_mask[:, None] & (kb < K)[None, :]
        wb = tl.load(w_ptr + rows[:, None] + kb[None, :], mask=b_mask, other=0.0)
        if SWIGLU:
            ub = tl.load(w_ptr + up_rows[:, None] + kb[None, :], mask=b_mask, other=0.0)
    pdl_enter(PDL)
    pdl_release(PDL)  # at once: the next kernel's programs may start loading their weights
    x_scale = 1.0 if DYNAMIC_X else tl.load(x_scale_ptr)
    if ROW_SCALES:
        ws = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
        wsu = ws
        if SWIGLU:
            wsu = tl.load(w_scale_ptr + N_OUT + offs_n, mask=n_mask, other=0.0)
    else:
        ws = tl.load(w_scale_ptr)
        wsu = ws
    for m in range(M):  # each token one more pass over the registers (so: few tokens)
        if DYNAMIC_X:  # this token's scale, amax / 448, as quantize_fp8_dynamic_per_token (every program alike)
            amax = tl.max(tl.abs(tl.load(x_ptr + m * stride_xm + ka).to(tl.float32)), axis=0)
            if KB > 0:
                xb = tl.load(x_ptr + m * stride_xm + kb, mask=kb < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=0))
            x_scale = tl.maximum(amax, 1e-12) / 448.0
        xa = _quantized(tl.load(x_ptr + m * stride_xm + ka), x_scale)
        acc = tl.sum(wa.to(tl.float32) * xa[None, :], axis=1)
        if SWIGLU:
            acc_up = tl.sum(ua.to(tl.float32) * xa[None, :], axis=1)
        if KB > 0:
            xb = _quantized(tl.load(x_ptr + m * stride_xm + kb, mask=kb < K, other=0.0), x_scale)
            acc += tl.sum(wb.to(tl.float32) * xb[None, :], axis=1)
            if SWIGLU:
                acc_up += tl.sum(ub.to(tl.float32) * xb[None, :], axis=1)
        y = acc * (x_scale * ws)
        if SWIGLU:
            y = y / (1.0 + tl.exp(-y)) * (acc_up * (x_scale * wsu))
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def k_pieces(k: int) -> tuple[int, int]:
    """(KA, KB): KA the largest power of two <= k, KB the rest rounded up to a power of two (0 if none)."""
    ka = 1 << (k.bit_length() - 1)
    return ka, (triton.next_power_of_2(k - ka) if k > ka else 0)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
             out_dtype: torch.dtype, swiglu: bool = False, config: tuple | None = None) -> torch.Tensor:
    """x [M, K] (M: a token or two; each costs one more pass of CUDA-core math), weight [N, K] e4m3
    row-major, K <= GEMV_MAX_K, weight_scale scalar or [N], input_scale scalar (static) or None (each token's
    amax / 448, computed in every program: the FP8_PER_CHANNEL_PER_TOKEN lm_head); config (BLOCK_N,
    num_warps). Returns [M, N] (or [M, N/2], silu(gate) * up, with swiglu) in out_dtype."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.dtype == torch.float8_e4m3fn and weight.shape[1] == K and weight.stride(1) == 1, \
        f"weight must be e4m3 [N, {K}] row-major, got {weight.dtype} {list(weight.shape)}"
    assert K <= GEMV_MAX_K and x.stride(1) == 1, f"fp8_gemv: K={K}, at most {GEMV_MAX_K}"
    n_out = N // 2 if swiglu else N
    block_n, num_warps = config or table(x.device).gemv_config(N, K, 1, swiglu)  # by default the one-token one
    ka, kb = k_pieces(K)
    out = torch.empty((M, n_out), dtype=out_dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, weight_scale, weight_scale if input_scale is None else input_scale, out, M, n_out, K, x.stride(0),
        weight.stride(0), out.stride(0), ROW_SCALES=weight_scale.numel() > 1, SWIGLU=swiglu, BLOCK_N=block_n, KA=ka,
        KB=kb, DYNAMIC_X=input_scale is None, **pdl_launch(x.device), num_warps=num_warps)
    return out
