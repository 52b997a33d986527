"""FP8 low-latency GEMM for a few tokens (M <= 16): y = quant(x) @ W^T * scales, optional SwiGLU.

Decode at batch 1..8 is weight-streaming: every weight byte is read once, the math is free. Each
program owns BLOCK_N output rows and streams them along K; the M <= 16 token rows ride along in one
fp8 tl.dot. The activation is quantized in the kernel (x / input_scale, saturated), so no separate
quantize launch. With SWIGLU the program also streams the matching `up` rows (N/2 further down) and
writes silu(gate) * up: the FC13 + SwiGLU fusion.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_gemm_kernel(
    # tensors
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, out_ptr,
    # sizes and strides
    M, N_OUT, K, stride_xm, stride_wn, stride_om,
    # meta
    ROW_SCALES: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT
    x_scale = tl.load(x_scale_ptr)
    rows = offs_n.to(tl.int64) * stride_wn  # int64: lm_head rows * K passes 2^31
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SWIGLU:
        up_rows = (offs_n + N_OUT).to(tl.int64) * stride_wn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        w = tl.load(w_ptr + rows[:, None] + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        x8 = tl.clamp(x / x_scale, -448.0, 448.0).to(tl.float8e4nv)
        acc += tl.dot(x8, tl.trans(w))
        if SWIGLU:
            wu = tl.load(w_ptr + up_rows[:, None] + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up += tl.dot(x8, tl.trans(wu))
    if ROW_SCALES:
        ws = tl.load(w_scale_ptr + offs_n, mask=n_mask, other=0.0)
    else:
        ws = tl.load(w_scale_ptr)
    y = acc * (x_scale * ws)
    if SWIGLU:
        if ROW_SCALES:
            wsu = tl.load(w_scale_ptr + offs_n + N_OUT, mask=n_mask, other=0.0)
        else:
            wsu = ws
        up = acc_up * (x_scale * wsu)
        y = y / (1.0 + tl.exp(-y)) * up
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def fp8_gemm_small_m(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                     out_dtype: torch.dtype, swiglu: bool = False, block_n: int = 16, block_k: int = 256,
                     num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M, K] (M <= 16), weight [N, K] e4m3, weight_scale scalar or [N], input_scale scalar.
    Returns [M, N] (or [M, N/2] with swiglu) in out_dtype."""
    M, K = x.shape
    N = weight.shape[0]
    assert M <= 16, f"fp8_gemm_small_m: M={M} tokens, expected at most 16"
    assert weight.dtype == torch.float8_e4m3fn and weight.shape[1] == K and weight.stride(1) == 1, \
        f"weight must be e4m3 [N, {K}] row-major, got {weight.dtype} {list(weight.shape)}"
    assert x.stride(1) == 1
    n_out = N // 2 if swiglu else N
    out = torch.empty((M, n_out), dtype=out_dtype, device=x.device)
    row_scales = weight_scale.numel() > 1
    grid = (triton.cdiv(n_out, block_n),)
    _fp8_gemm_kernel[grid](x, weight, weight_scale, input_scale, out, M, n_out, K, x.stride(0), weight.stride(0),
                           out.stride(0), ROW_SCALES=row_scales, SWIGLU=swiglu, BLOCK_M=16, BLOCK_N=block_n,
                           BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out
