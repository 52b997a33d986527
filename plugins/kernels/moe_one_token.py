"""The MoE FFN of one decode token at top-1 (Maverick): the two passes of moe_gemv, with every program's
weight rows in registers as in fp8_gemv, requested as early as they are known.

Pass 1 (FC13 + SwiGLU), one program per (BLOCK_N intermediate rows, row): row 0 the chosen expert (input
score * x), row 1 the shared expert (input x). The shared expert's rows are requested before the PDL wait;
the chosen expert's only after it, since the router (the kernel just before) writes its id. Pass 2 (FC2),
one program per BLOCK_N hidden rows: with PDL "late" the router finished before pass 1 released pass 2, so
the id may be read before the wait, and both experts' down rows are requested before it; only pass 1's
output waits. Static input scales only (ModelOpt); moe_gemv handles the rest.
Numerics as moe_gemv / moe_ffn_ref: the score times x rounded to x's dtype, exact FP8 products, fp32 sums,
each expert's output rounded to the activation dtype before they are added.
"""
import torch
import triton
import triton.language as tl

from ..dispatch import PDL, PDL_LAUNCH
from .fp8_gemv import _quantized, k_pieces
from .pdl import pdl_enter, pdl_release


@triton.jit
def _rows(base, rows, n_mask, K, KA: tl.constexpr, KB: tl.constexpr):
    """Weight rows [BLOCK_N, KA] and [BLOCK_N, KB] (the second masked to K; a dummy tile when KB == 0)."""
    ka = tl.arange(0, KA)
    wa = tl.load(base + rows[:, None] + ka[None, :], mask=n_mask[:, None], other=0.0)
    if KB > 0:
        kb = KA + tl.arange(0, KB)
        wb = tl.load(base + rows[:, None] + kb[None, :], mask=n_mask[:, None] & (kb < K)[None, :], other=0.0)
    else:  # a one-column tile that is never used
        wb = tl.zeros((wa.shape[0], 1), dtype=wa.dtype)
    return wa, wb


@triton.jit
def _dot(wa, wb, x_row, score, x_scale, K, KA: tl.constexpr, KB: tl.constexpr):
    """Raw FP8 dots of the rows with quantize(score * x_row), score * x rounded to x's dtype first."""
    ka = tl.arange(0, KA)
    dtype = x_row.dtype.element_ty
    acc = tl.sum(wa.to(tl.float32) * _quantized((tl.load(x_row + ka) * score).to(dtype), x_scale)[None, :], axis=1)
    if KB > 0:
        kb = KA + tl.arange(0, KB)
        xb = (tl.load(x_row + kb, mask=kb < K, other=0.0) * score).to(dtype)
        acc += tl.sum(wb.to(tl.float32) * _quantized(xb, x_scale)[None, :], axis=1)
    return acc


@triton.jit
def _fc13_kernel(
    x_ptr, ids_ptr, scores_ptr, w_ptr, w_scale_ptr, x_scale_ptr,  # routed: gate_up [E, 2I, H]
    sw_ptr, sw_scale_ptr, sx_scale_ptr,  # shared: gate_up [2Is, H], row scales or scalar, input scale
    out_ptr,  # h [2, max(I, Is)]
    N_OUT, N_SHARED, K, E_LOCAL, expert_offset,
    stride_we, stride_wn, stride_swn, stride_o, scale_stride_e, scale_stride_n, shared_scale_stride_n,
    BLOCK_N: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    shared = tl.program_id(1) == 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_out = tl.where(shared, N_SHARED, N_OUT)
    n_mask = offs_n < n_out
    if shared:  # the shared expert's gate and up rows: known before the router has run
        rows = offs_n.to(tl.int64) * stride_swn
        ga, gb = _rows(sw_ptr, rows, n_mask, K, KA, KB)
        ua, ub = _rows(sw_ptr, rows + N_SHARED.to(tl.int64) * stride_swn, n_mask, K, KA, KB)
        pdl_enter(PDL)
    else:  # the chosen expert's rows, once the router wrote its id (none if another rank holds it)
        pdl_enter(PDL)
        e = tl.load(ids_ptr) - expert_offset
        local = (e >= 0) & (e < E_LOCAL)
        base = w_ptr + tl.where(local, e, 0).to(tl.int64) * stride_we
        rows = offs_n.to(tl.int64) * stride_wn
        ga, gb = _rows(base, rows, n_mask & local, K, KA, KB)
        ua, ub = _rows(base, rows + N_OUT.to(tl.int64) * stride_wn, n_mask & local, K, KA, KB)
    pdl_release(PDL)
    e = tl.load(ids_ptr) - expert_offset
    local = shared | ((e >= 0) & (e < E_LOCAL))
    e = tl.where(local & ~shared, e, 0).to(tl.int64)
    score = tl.where(shared, 1.0, tl.load(scores_ptr).to(tl.float32))
    x_scale = tl.where(shared, tl.load(sx_scale_ptr), tl.load(x_scale_ptr))
    s_base = tl.where(shared, sw_scale_ptr, w_scale_ptr + e * scale_stride_e)
    s_step = tl.where(shared, shared_scale_stride_n, scale_stride_n)
    gate = _dot(ga, gb, x_ptr, score, x_scale, K, KA, KB) * x_scale * tl.load(s_base + offs_n * s_step, mask=n_mask,
                                                                              other=0.0)
    up = _dot(ua, ub, x_ptr, score, x_scale, K, KA, KB) * x_scale * tl.load(s_base + (n_out + offs_n) * s_step,
                                                                            mask=n_mask, other=0.0)
    y = tl.where(local, gate / (1.0 + tl.exp(-gate)) * up, 0.0)
    tl.store(out_ptr + tl.program_id(1).to(tl.int64) * stride_o + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _fc2_kernel(
    h_ptr, ids_ptr, w_ptr, w_scale_ptr, x_scale_ptr,  # routed: down [E, H, I]
    sw_ptr, sw_scale_ptr, sx_scale_ptr,  # shared: down [H, Is], scalar scales
    out_ptr,  # [1, H]
    N_OUT, K, K_SHARED, E_LOCAL, expert_offset, stride_we, stride_wn, stride_swn, stride_h,
    scale_stride_e, scale_stride_n,
    HAS_SHARED: tl.constexpr, BLOCK_N: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, KSA: tl.constexpr,
    KSB: tl.constexpr, PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    if PDL != 2:  # the id is safe to read early only if pass 1 released this kernel after its own wait
        pdl_enter(PDL)
    e = tl.load(ids_ptr) - expert_offset
    local = (e >= 0) & (e < E_LOCAL)
    e = tl.where(local, e, 0).to(tl.int64)
    wa, wb = _rows(w_ptr + e * stride_we, offs_n.to(tl.int64) * stride_wn, n_mask & local, K, KA, KB)
    if HAS_SHARED:
        sa, sb = _rows(sw_ptr, offs_n.to(tl.int64) * stride_swn, n_mask, K_SHARED, KSA, KSB)
    if PDL == 2:
        pdl_enter(PDL)
    pdl_release(PDL)
    dtype = out_ptr.dtype.element_ty
    x_scale = tl.load(x_scale_ptr)
    ws = tl.load(w_scale_ptr + e * scale_stride_e + offs_n * scale_stride_n, mask=n_mask, other=0.0)
    acc = _dot(wa, wb, h_ptr, 1.0, x_scale, K, KA, KB)
    out = tl.where(local, acc * (x_scale * ws), 0.0).to(dtype)  # the reference rounds each expert's output
    if HAS_SHARED:
        sx = tl.load(sx_scale_ptr)
        shared = (_dot(sa, sb, h_ptr + stride_h, 1.0, sx, K_SHARED, KSA, KSB) * (sx * tl.load(sw_scale_ptr))).to(dtype)
        out = (out.to(tl.float32) + shared.to(tl.float32)).to(dtype)  # shared_expert(x) + routed
    tl.store(out_ptr + offs_n, out, mask=n_mask)


# (BLOCK_N, num_warps) of pass 1 and pass 2, measured on H200 at TP8 sizes (H 5120, I = Is = 1024) with
# scripts/tune_kernels.py --parts moe1
CONFIG = ((4, 2), (16, 2))
MAX_K = 8192  # a program holds BLOCK_N x K weight bytes (twice, gate and up) in registers


def fits(x: torch.Tensor, top_ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, static: bool) -> bool:
    """Whether this path runs the case: one token, top-1, static input scales, rows short enough."""
    return x.shape[0] == 1 and top_ids.shape[1] == 1 and static and x.shape[1] <= MAX_K and down.shape[2] <= MAX_K


def moe_one_token(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, expert_offset: int, gate_up_scale: torch.Tensor, gate_up_input_scale: torch.Tensor,
                  down_scale: torch.Tensor, down_input_scale: torch.Tensor, shared: tuple | None = None,
                  config: tuple | None = None) -> torch.Tensor:
    """moe_gemv.moe_experts_gemv's contract for the case `fits` accepts; config ((BLOCK_N, warps) of pass 1,
    of pass 2)."""
    (bn1, nw1), (bn2, nw2) = config or CONFIG
    H = x.shape[1]
    I = gate_up.shape[1] // 2
    if shared is not None:
        sgu, sgu_scale, sgu_in, sdn, sdn_scale, sdn_in = shared
        Is = sgu.shape[0] // 2
    else:  # the shared slots point at the routed tensors and no program reads them
        sgu, sgu_scale, sgu_in, sdn, sdn_scale, sdn_in, Is = gate_up[0], gate_up_scale, gate_up_input_scale, \
            down[0], down_scale, down_input_scale, 0
    rows = 2 if shared is not None else 1
    h = torch.empty((rows, max(I, Is)), dtype=x.dtype, device=x.device)
    se, sn = (0, 0) if gate_up_scale.numel() == 1 else (gate_up_scale.stride(0), gate_up_scale.stride(1))
    ka, kb = k_pieces(H)
    _fc13_kernel[(triton.cdiv(max(I, Is), bn1), rows)](
        x, top_ids, top_scores, gate_up, gate_up_scale, gate_up_input_scale, sgu, sgu_scale, sgu_in, h,
        I, Is, H, gate_up.shape[0], expert_offset, gate_up.stride(0), gate_up.stride(1), sgu.stride(0), h.stride(0),
        se, sn, 0 if sgu_scale.numel() == 1 else 1, BLOCK_N=bn1, KA=ka, KB=kb, PDL=PDL, **PDL_LAUNCH, num_warps=nw1)
    out = torch.empty((1, H), dtype=x.dtype, device=x.device)
    se, sn = (0, 0) if down_scale.numel() == 1 else (down_scale.stride(0), down_scale.stride(1))
    ka, kb = k_pieces(I)
    ksa, ksb = k_pieces(max(Is, 1))
    _fc2_kernel[(triton.cdiv(H, bn2),)](
        h, top_ids, down, down_scale, down_input_scale, sdn, sdn_scale, sdn_in, out, H, I, Is, down.shape[0],
        expert_offset, down.stride(0), down.stride(1), sdn.stride(0), h.stride(0), se, sn,
        HAS_SHARED=shared is not None, BLOCK_N=bn2, KA=ka, KB=kb, KSA=ksa, KSB=ksb, PDL=PDL, **PDL_LAUNCH,
        num_warps=nw2)
    return out
