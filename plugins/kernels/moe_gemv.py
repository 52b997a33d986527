"""Min-latency MoE: the selected experts only, one program per (token, chosen expert, BLOCK_N rows).

Pass 1 (FC13 + SwiGLU): input = score * x (the router score scales the expert INPUT), quantized to
FP8 with the static input scale (ModelOpt) or per token on the fly (Meta FP8), times this expert's
gate and up rows; writes silu(gate) * up. Pass 2 (FC2): the same kernel without score or SwiGLU.
Only the chosen experts' weights are read: at top-1, TP8, 1 token that is 15.7 MB instead of the
2 GB a dense loop over all 128 experts would stream. Pairs routed to an expert another rank holds
(expert parallelism) write zeros.
"""
import torch
import triton
import triton.language as tl

from ..dispatch import PDL, PDL_LAUNCH
from .pdl import pdl_enter


@triton.jit
def _moe_gemv_kernel(
    # tensors
    x_ptr, ids_ptr, scores_ptr, w_ptr, w_scale_ptr, x_scale_ptr, out_ptr,
    # sizes and strides
    N_OUT, K, E_LOCAL, expert_offset, TOP_K, stride_we, stride_wn, stride_x, stride_o,
    # meta
    X_PER_PAIR: tl.constexpr,  # x rows are per (token, k) pair (pass 2) instead of per token (pass 1)
    SCALE_INPUT: tl.constexpr, SWIGLU: tl.constexpr, CHANNEL_SCALES: tl.constexpr, DYNAMIC_X: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pair = tl.program_id(1)
    token = pair // TOP_K
    e = tl.load(ids_ptr + pair) - expert_offset
    local = (e >= 0) & (e < E_LOCAL)
    e = tl.where(local, e, 0).to(tl.int64)
    x_row = x_ptr + (pair if X_PER_PAIR else token).to(tl.int64) * stride_x
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N_OUT
    w_base = w_ptr + e * stride_we
    score = tl.load(scores_ptr + pair).to(tl.float32) if SCALE_INPUT else 1.0
    if DYNAMIC_X:  # per-token scale: amax of this (scaled) row / 448
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xv = tl.load(x_row + k, mask=k < K, other=0.0)
            if SCALE_INPUT:
                xv = (xv * score).to(x_ptr.dtype.element_ty)
            amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
        x_scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    else:
        x_scale = tl.load(x_scale_ptr)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SWIGLU:
        acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rows = offs_n.to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xv = tl.load(x_row + k, mask=k_mask, other=0.0)
        if SCALE_INPUT:
            xv = (xv * score).to(x_ptr.dtype.element_ty)  # the reference rounds score * x to the input dtype
        x8 = tl.clamp(xv.to(tl.float32) / x_scale, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
        w = tl.load(w_base + rows[:, None] + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x8[None, :], axis=1)
        if SWIGLU:
            wu = tl.load(w_base + rows[:, None] + N_OUT * stride_wn + k[None, :],
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up += tl.sum(wu.to(tl.float32) * x8[None, :], axis=1)
    if CHANNEL_SCALES:
        n_rows = N_OUT * 2 if SWIGLU else N_OUT
        ws = tl.load(w_scale_ptr + e * n_rows + offs_n, mask=n_mask, other=0.0)
    else:
        ws = tl.load(w_scale_ptr)
    y = acc * (x_scale * ws)
    if SWIGLU:
        if CHANNEL_SCALES:
            wsu = tl.load(w_scale_ptr + e * N_OUT * 2 + N_OUT + offs_n, mask=n_mask, other=0.0)
        else:
            wsu = ws
        up = acc_up * (x_scale * wsu)
        y = y / (1.0 + tl.exp(-y)) * up
    y = tl.where(local, y, 0.0)
    tl.store(out_ptr + pair.to(tl.int64) * stride_o + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def _launch(x, ids, scores, w, w_scale, x_scale, n_out, x_per_pair, swiglu, expert_offset, top_k, block_n,
            block_k, num_warps):
    P = ids.numel()
    E_local, N, K = w.shape
    out = torch.empty((P, n_out), dtype=x.dtype, device=x.device)
    dynamic = x_scale is None
    channel = w_scale.numel() > 1
    grid = (triton.cdiv(n_out, block_n), P)
    _moe_gemv_kernel[grid](x, ids, scores, w, w_scale, x_scale if not dynamic else w_scale, out,
                           n_out, K, E_local, expert_offset, top_k, w.stride(0), w.stride(1), x.stride(0),
                           out.stride(0), X_PER_PAIR=x_per_pair, SCALE_INPUT=swiglu, SWIGLU=swiglu,
                           CHANNEL_SCALES=channel, DYNAMIC_X=dynamic, BLOCK_N=block_n, BLOCK_K=block_k,
                           PDL=PDL, **PDL_LAUNCH, num_warps=num_warps)
    return out


# Measured on H200 at TP8 (scripts/tune_kernels.py): BLOCK_N 4, BLOCK_K 1024, 4 warps: 11.1 us for both
# passes of one token's expert (15.7 MB) against 40.6 us with (32, 256, 4), which left 32 programs to
# stream the FC13 rows.
DEFAULT_CONFIG = (4, 1024, 4)  # BLOCK_N, BLOCK_K, num_warps


def moe_experts_gemv(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, expert_offset: int, gate_up_scale: torch.Tensor,
                     gate_up_input_scale: torch.Tensor | None, down_scale: torch.Tensor,
                     down_input_scale: torch.Tensor | None, config: tuple | None = None) -> torch.Tensor:
    """Routed experts for FP8 weights (gate_up [E, 2I, H], down [E, H, I]); returns [T, H] in x's dtype."""
    block_n, block_k, num_warps = config or DEFAULT_CONFIG
    T, H = x.shape
    k = top_ids.shape[1]
    ids = top_ids.reshape(-1).contiguous()
    scores = top_scores.reshape(-1).contiguous()
    I = gate_up.shape[1] // 2
    h = _launch(x, ids, scores, gate_up, gate_up_scale, gate_up_input_scale, I, False, True, expert_offset, k,
                block_n, block_k, num_warps)
    y = _launch(h, ids, scores, down, down_scale, down_input_scale, H, True, False, expert_offset, k,
                block_n, block_k, num_warps)
    return y.view(T, k, H).sum(dim=1) if k > 1 else y
