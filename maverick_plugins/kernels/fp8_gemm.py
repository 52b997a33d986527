"""FP8 low-latency GEMM for a few tokens (M <= 16): y = quant(x) @ W^T * scales, optional SwiGLU.
(A token or two take fp8_gemv instead where dispatch.linear says so: faster at every TP8 shape.)

Decode at batch 1..8 is weight-streaming: every weight byte is read once, the math is free. Each
program owns BLOCK_N output rows and streams them along K; the M <= 16 token rows ride along in one
fp8 tl.dot. The activation is quantized in the kernel (x / input_scale, saturated), so no separate
quantize launch. With SWIGLU the program also streams the matching `up` rows (N/2 further down) and
writes silu(gate) * up: the FC13 + SwiGLU fusion.

SWAP_AB computes y^T = W x^T instead: the weight tile is the MMA's M side (64 rows fill a Hopper
wgmma) and the tokens its N side, where y = x W^T on M <= 16 can only use mma.sync. Offline sm_90
builds: 72-118 registers a thread instead of 142-252. Triton's default lets an FP8 wgmma accumulate the
whole K in the tensor core's reduced precision (2e-4 relative at K=5120, and 0.16 of the logits of the
tiny fp32 GPU test); partial sums go to the fp32 accumulator every 128 products instead, as DeepSeek-V3
does on Hopper. Which wins is measured per shape (dispatch.DeviceTable.gemm).
"""
import torch
import triton
import triton.language as tl

from ..dispatch import options, sm_count, table
from .counters import arrival_counters, last_to_arrive, reset_arrivals
from .e4m3 import to_e4m3
from .pdl import pdl_enter, pdl_launch, pdl_release


@triton.jit
def _fp8_gemm_kernel(
    # tensors
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, out_ptr, partial_ptr, counter_ptr,
    # sizes and strides
    M, N_OUT, K, K_PER_SPLIT, stride_xm, stride_wn, stride_om,
    # meta
    ROW_SCALES: tl.constexpr, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr, SERIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT
    rows = offs_n.to(tl.int64) * stride_wn  # int64: lm_head rows * K passes 2^31
    up_rows = (offs_n + N_OUT).to(tl.int64) * stride_wn
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    pdl_enter(PDL)
    x_scale = tl.load(x_scale_ptr)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # used with SWIGLU only
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        w = tl.load(w_ptr + rows[:, None] + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        x8 = to_e4m3(x, x_scale)
        acc += _mma(x8, w, SWAP_AB, BLOCK_K)
        if SWIGLU:
            wu = tl.load(w_ptr + up_rows[:, None] + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up += _mma(x8, wu, SWAP_AB, BLOCK_K)
    pdl_release(PDL)
    if SWAP_AB:  # back to [tokens, rows] for the shared epilogue
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    if SPLIT_K > 1:  # raw partial sums [SPLIT_K, 2, BLOCK_M, N_OUT]; _splitk_epilogue_kernel finishes
        base = partial_ptr + (pid_k * 2 * BLOCK_M + offs_m[:, None]) * N_OUT + offs_n[None, :]
        tl.store(base, acc, mask=n_mask[None, :])
        if SWIGLU:
            tl.store(base + BLOCK_M * N_OUT, acc_up, mask=n_mask[None, :])
        if SERIAL:  # the last split of this column block to finish reduces them: no epilogue launch
            if last_to_arrive(counter_ptr + pid_n, SPLIT_K):
                acc, acc_up = _sum_splits(partial_ptr, offs_m, offs_n, m_mask, n_mask, N_OUT, SWIGLU, SPLIT_K,
                                          BLOCK_M, BLOCK_N, True)
                _epilogue(acc, acc_up, offs_m, offs_n, m_mask, n_mask, w_scale_ptr, x_scale, out_ptr, stride_om,
                          N_OUT, ROW_SCALES, SWIGLU)
                reset_arrivals(counter_ptr + pid_n)
    else:
        _epilogue(acc, acc_up, offs_m, offs_n, m_mask, n_mask, w_scale_ptr, x_scale, out_ptr, stride_om, N_OUT,
                  ROW_SCALES, SWIGLU)


@triton.jit
def _mma(x8, w, SWAP_AB: tl.constexpr, BLOCK_K: tl.constexpr):
    """x8 [tokens, K] times w [rows, K]^T: as x8 w^T (mma.sync), or with SWAP_AB as w x8^T ([rows, tokens],
    wgmma), whose FP8 sums go to fp32 every 128 products (the tensor core's own adds are shorter)."""
    if SWAP_AB:
        y = tl.dot(w, tl.trans(x8), max_num_imprecise_acc=min(BLOCK_K, 128))
    else:
        y = tl.dot(x8, tl.trans(w))
    return y


@triton.jit
def _epilogue(acc, acc_up, offs_m, offs_n, m_mask, n_mask, w_scale_ptr, x_scale, out_ptr, stride_om, N_OUT,
              ROW_SCALES: tl.constexpr, SWIGLU: tl.constexpr):
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


@triton.jit
def _sum_splits(partial_ptr, offs_m, offs_n, m_mask, n_mask, N_OUT, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, L2_ONLY: tl.constexpr):
    """Partial sums of every split, added in split order (the same order in both reductions).
    L2_ONLY: the partials were written by other programs of this launch: read past L1."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mask = m_mask[:, None] & n_mask[None, :]
    for s in range(SPLIT_K):
        base = partial_ptr + (s * 2 * BLOCK_M + offs_m[:, None]) * N_OUT + offs_n[None, :]
        if L2_ONLY:
            acc += tl.load(base, mask=mask, other=0.0, cache_modifier=".cg")
            if SWIGLU:
                acc_up += tl.load(base + BLOCK_M * N_OUT, mask=mask, other=0.0, cache_modifier=".cg")
        else:
            acc += tl.load(base, mask=mask, other=0.0)
            if SWIGLU:
                acc_up += tl.load(base + BLOCK_M * N_OUT, mask=mask, other=0.0)
    return acc, acc_up


@triton.jit
def _splitk_epilogue_kernel(partial_ptr, w_scale_ptr, x_scale_ptr, out_ptr, M, N_OUT, stride_om,
                            ROW_SCALES: tl.constexpr, SWIGLU: tl.constexpr, SPLIT_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pdl_release(PDL)
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N_OUT
    acc, acc_up = _sum_splits(partial_ptr, offs_m, offs_n, m_mask, n_mask, N_OUT, SWIGLU, SPLIT_K, BLOCK_M, BLOCK_N,
                              False)
    _epilogue(acc, acc_up, offs_m, offs_n, m_mask, n_mask, w_scale_ptr, tl.load(x_scale_ptr), out_ptr, stride_om,
              N_OUT, ROW_SCALES, SWIGLU)


def fp8_gemm_small_m(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                     out_dtype: torch.dtype, swiglu: bool = False, config: tuple | None = None,
                     serial: bool | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16), weight [N, K] e4m3, weight_scale scalar or [N], input_scale scalar.
    Returns [M, N] (or [M, N/2] with swiglu) in out_dtype. serial (default: the current KernelOptions.splitk_serial):
    with split-K, the last split of each column block reduces the partials itself instead of a second
    epilogue launch."""
    M, K = x.shape
    N = weight.shape[0]
    assert M <= 16, f"fp8_gemm_small_m: M={M} tokens, expected at most 16"
    assert weight.dtype == torch.float8_e4m3fn and weight.shape[1] == K and weight.stride(1) == 1, \
        f"weight must be e4m3 [N, {K}] row-major, got {weight.dtype} {list(weight.shape)}"
    assert x.stride(1) == 1
    n_out = N // 2 if swiglu else N
    block_n, block_k, split_k, num_warps, num_stages, *rest = config or table(x.device).gemm_config(N, K, sm_count(x.device))
    swap = bool(rest and rest[0])  # the 6th entry; 5-entry configs mean x W^T
    out = torch.empty((M, n_out), dtype=out_dtype, device=x.device)
    row_scales = weight_scale.numel() > 1
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    partial = torch.empty((split_k, 2, 16, n_out), dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (triton.cdiv(n_out, block_n), split_k)
    serial = (options().splitk_serial if serial is None else serial) and split_k > 1
    counters = arrival_counters(x.device, grid[0], "fp8_gemm") if serial else partial
    _fp8_gemm_kernel[grid](x, weight, weight_scale, input_scale, out, partial, counters, M, n_out, K, k_per_split,
                           x.stride(0), weight.stride(0), out.stride(0), ROW_SCALES=row_scales, SWIGLU=swiglu,
                           SPLIT_K=split_k, SERIAL=serial, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k,
                           SWAP_AB=swap, **pdl_launch(x.device), num_warps=num_warps,
                           num_stages=num_stages)
    if split_k > 1 and not serial:
        _splitk_epilogue_kernel[(triton.cdiv(n_out, 128),)](partial, weight_scale, input_scale, out, M, n_out,
                                                              out.stride(0), ROW_SCALES=row_scales, SWIGLU=swiglu,
                                                              SPLIT_K=split_k, BLOCK_M=16, BLOCK_N=128,
                                                              **pdl_launch(x.device), num_warps=4)
    return out
