"""MoE pass 2 (FC2) of one token at top-1 with its weight rows in registers, requested before the PDL wait.

Under PDL "late" the router finished before pass 1 released this kernel (pass 1 releases after its own
wait), so the chosen expert's id may be read before the wait: both the chosen expert's and the shared
expert's down rows stream while pass 1 still runs; only pass 1's output h waits. Numerics as moe_gemv's
pass 2: exact FP8 products, fp32 sums, each expert's output rounded to the activation dtype, then added.
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
def _dot(wa, wb, x_row, x_scale, K, KA: tl.constexpr, KB: tl.constexpr):
    """Raw FP8 dots of the rows (two K pieces, as _rows gives them) with quantize(x_row)."""
    ka = tl.arange(0, KA)
    acc = tl.sum(wa.to(tl.float32) * _quantized(tl.load(x_row + ka), x_scale)[None, :], axis=1)
    if KB > 0:
        kb = KA + tl.arange(0, KB)
        acc += tl.sum(wb.to(tl.float32) * _quantized(tl.load(x_row + kb, mask=kb < K, other=0.0), x_scale)[None, :],
                      axis=1)
    return acc


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
    acc = _dot(wa, wb, h_ptr, x_scale, K, KA, KB)
    out = tl.where(local, acc * (x_scale * ws), 0.0).to(dtype)  # the reference rounds each expert's output
    if HAS_SHARED:
        sx = tl.load(sx_scale_ptr)
        shared = (_dot(sa, sb, h_ptr + stride_h, sx, K_SHARED, KSA, KSB) * (sx * tl.load(sw_scale_ptr))).to(dtype)
        out = (out.to(tl.float32) + shared.to(tl.float32)).to(dtype)  # shared_expert(x) + routed
    tl.store(out_ptr + offs_n, out, mask=n_mask)


# (BLOCK_N, num_warps), H200 at TP8 sizes (H 5120, I = Is = 1024)
CONFIG = (16, 2)
MAX_K = 8192  # a program holds BLOCK_N x (I + Is) weight bytes in registers


def fc2_one_token(h: torch.Tensor, top_ids: torch.Tensor, down: torch.Tensor, expert_offset: int,
                  down_scale: torch.Tensor, down_input_scale: torch.Tensor, shared: tuple | None,
                  out_dtype: torch.dtype, config: tuple | None = None) -> torch.Tensor:
    """h [1 + shared, >= I] (pass 1's rows: the chosen expert's, then the shared expert's), top_ids [1, 1],
    down [E, H, I] e4m3 with scalar or [E, H] scales, static input scale; shared = (down [H, Is], scalar
    scale, input scale) or None. Returns [1, H]."""
    block_n, num_warps = config or CONFIG
    H, I = down.shape[1], down.shape[2]
    sdn, sdn_scale, sdn_in = shared if shared is not None else (down[0], down_scale, down_input_scale)
    Is = sdn.shape[1] if shared is not None else 0
    se, sn = (0, 0) if down_scale.numel() == 1 else (down_scale.stride(0), down_scale.stride(1))
    ka, kb = k_pieces(I)
    ksa, ksb = k_pieces(max(Is, 1))
    out = torch.empty((1, H), dtype=out_dtype, device=h.device)
    _fc2_kernel[(triton.cdiv(H, block_n),)](
        h, top_ids, down, down_scale, down_input_scale, sdn, sdn_scale, sdn_in, out, H, I, Is, down.shape[0],
        expert_offset, down.stride(0), down.stride(1), sdn.stride(0), h.stride(0), se, sn,
        HAS_SHARED=shared is not None, BLOCK_N=block_n, KA=ka, KB=kb, KSA=ksa, KSB=ksb, PDL=PDL, **PDL_LAUNCH,
        num_warps=num_warps)
    return out
