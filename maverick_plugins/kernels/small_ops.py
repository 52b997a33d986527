"""Fused element-wise kernels of the decode step (one launch each instead of 5-20 small torch ops).

- add_rms_norm: h = x + delta; (h, rmsnorm(h)) -- the residual add and the next norm.
- qkv_post: split the fused QKV output, RoPE (interleaved pairs) + QK L2-norm on RoPE layers, the
  NoPE temperature scale on queries; one program per (token, head).
- kv_write: this step's K and V into their cache slots, quantized when the cache is FP8.
- router: the MoE router GEMV and its top-k + sigmoid in one launch (the last program to finish picks).
Each rounds to the activation dtype where the reference does, so results match it.
"""
import torch
import triton
import triton.language as tl

from .counters import arrival_counters, last_to_arrive, reset_arrivals
from .e4m3 import to_e4m3
from .pdl import pdl_enter, pdl_launch, pdl_release
from .qk_rows import load_qk_rows, temperature
from .router_pick import argmax_lowest, row_logits, sigmoid_score


@triton.jit
def add_rms_norm_row(x_ptr, delta, w_ptr, h_ptr, y_ptr, row, N, eps, offs, mask):
    """Row `row`: h = x + delta (rounded to h's dtype, as the reference adds), stored; then RMSNorm(h) * w."""
    h = (tl.load(x_ptr + row * N + offs, mask=mask, other=0.0) + delta).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * N + offs, h, mask=mask)
    hf = h.to(tl.float32)
    y = (hf * tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + row * N + offs, (y * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, d_ptr, w_ptr, h_ptr, y_ptr, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pdl_release(PDL)  # few programs at decode sizes (one wave): release at once
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    add_rms_norm_row(x_ptr, tl.load(d_ptr + row * N + offs, mask=mask, other=0.0), w_ptr, h_ptr, y_ptr, row, N, eps,
                     offs, mask)


def add_rms_norm_triton(x, delta, weight, eps):
    x, delta = x.contiguous(), delta.contiguous()
    h, y = torch.empty_like(x), torch.empty_like(x)
    N = x.shape[-1]
    block = triton.next_power_of_2(N)
    _add_rms_norm_kernel[(x.numel() // N,)](x, delta, weight, h, y, N, eps, BLOCK=block,
                                           **pdl_launch(x.device), num_warps=8 if block >= 4096 else 4)
    return h, y


@triton.jit
def _qkv_post_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    stride_t, HQ, KVH, eps, floor_scale, attn_scale,
    HEAD_DIM: tl.constexpr, USE_ROPE: tl.constexpr, QK_NORM: tl.constexpr, TEMPERATURE: tl.constexpr,
    CACHE: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    """Program (t, head): q heads, then k heads, then (CACHE) v heads. With CACHE, k and v also go to their
    cache slot (quantized when FP8) as kv_write does: one launch fewer per layer and step."""
    pdl_enter(PDL)
    pdl_release(PDL)  # few programs at decode sizes (one wave): release at once
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    is_q = head < HQ
    offs = tl.arange(0, HEAD_DIM)
    src = qkv_ptr + t * stride_t + head * HEAD_DIM
    dt = q_ptr.dtype.element_ty
    if CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
    else:  # the v branch below still compiles (it never runs: the grid has no v programs)
        slot = t * 0
    if head >= HQ + KVH:  # v: only with CACHE (the grid has no v programs otherwise)
        v = tl.load(src + offs)
        if FP8:
            v = to_e4m3(v, tl.load(vs_ptr))
        tl.store(vc_ptr + (slot * KVH + head - HQ - KVH) * HEAD_DIM + offs, v.to(vc_ptr.dtype.element_ty))
    else:
        one = tl.zeros([1], dtype=tl.int64)  # a one-row tile of the shared row helper
        x = load_qk_rows(src + one, t + one, one == 0, cos_ptr, sin_ptr, eps, offs, dt, HEAD_DIM, USE_ROPE, QK_NORM)
        if TEMPERATURE:
            if is_q:
                x = x * temperature(tl.load(pos_ptr + t), floor_scale, attn_scale)
        if is_q:
            dst = q_ptr + (t * HQ + head) * HEAD_DIM
        else:
            dst = k_ptr + (t * KVH + head - HQ) * HEAD_DIM
        tl.store(dst + one[:, None] + offs[None, :], x.to(dt))
        if CACHE:
            if not is_q:  # the cache takes k as returned (in its dtype)
                k = to_e4m3(x, tl.load(ks_ptr)) if FP8 else x
                tl.store(kc_ptr + (slot * KVH + head - HQ) * HEAD_DIM + one[:, None] + offs[None, :],
                         k.to(kc_ptr.dtype.element_ty))


def qkv_post_triton(qkv, cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm, eps, temperature,
                    cache=None):
    """cache: (k_cache, v_cache, slots, k_scale, v_scale) to write this step's k and v there as well."""
    T = qkv.shape[0]
    q = torch.empty((T, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((T, kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(T, kv_heads, head_dim)
    floor_scale, attn_scale = temperature if temperature else (1.0, 0.0)
    if cache is not None:
        kc, vc, slots, ks, vs = cache
        fp8 = kc.dtype == torch.float8_e4m3fn
        ks, vs = (ks, vs) if fp8 else (slots, slots)
    else:
        kc = vc = slots = ks = vs = qkv  # never read
        fp8 = False
    _qkv_post_kernel[(T, heads + kv_heads * (2 if cache is not None else 1))](
        qkv, cos, sin, positions, q, k, kc, vc, slots, ks, vs, qkv.stride(0), heads, kv_heads, eps,
        float(floor_scale), float(attn_scale), HEAD_DIM=head_dim, USE_ROPE=use_rope, QK_NORM=qk_norm,
        TEMPERATURE=temperature is not None, CACHE=cache is not None, FP8=fp8, **pdl_launch(qkv.device), num_warps=1)
    return q, k, v


@triton.jit
def _kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr, stride_kt, stride_vt, KVH,
                     HEAD_DIM: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pdl_release(PDL)  # few programs at decode sizes (one wave): release at once
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, HEAD_DIM)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + h * HEAD_DIM + offs)
    v = tl.load(v_ptr + t * stride_vt + h * HEAD_DIM + offs)
    if FP8:
        k = to_e4m3(k, tl.load(ks_ptr))
        v = to_e4m3(v, tl.load(vs_ptr))
    dst = (slot * KVH + h) * HEAD_DIM + offs
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty))
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty))


def kv_write_triton(k, v, k_cache, v_cache, slots, k_scale, v_scale):
    T, kvh, D = k.shape
    assert k.stride(1) == D and v.stride(1) == D and k.stride(2) == 1 and v.stride(2) == 1
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    _kv_write_kernel[(T, kvh)](k, v, k_cache, v_cache, slots, k_scale if fp8 else slots, v_scale if fp8 else slots,
                               k.stride(0), v.stride(0), kvh, HEAD_DIM=D, FP8=fp8, **pdl_launch(k.device), num_warps=1)


@triton.jit
def _router_topk_kernel(logits_ptr, ids_ptr, scores_ptr, E, TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    pdl_release(PDL)  # few programs at decode sizes (one wave): release at once
    t = tl.program_id(0).to(tl.int64)
    x, offs = row_logits(logits_ptr + t * E, E, BLOCK_E)
    _pick_top_k(x, offs, ids_ptr + t * TOP_K, scores_ptr + t * TOP_K, TOP_K, BLOCK_E)


def router_topk_triton(logits: torch.Tensor, top_k: int):
    T, E = logits.shape
    ids = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    scores = torch.empty((T, top_k), dtype=logits.dtype, device=logits.device)
    _router_topk_kernel[(T,)](logits.contiguous(), ids, scores, E, TOP_K=top_k,
                              BLOCK_E=triton.next_power_of_2(E), **pdl_launch(logits.device), num_warps=1)
    return ids, scores


@triton.jit
def _router_kernel(x_ptr, w_ptr, logits_ptr, counter_ptr, ids_ptr, scores_ptr, T, E, K, stride_x,
                   TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, E_POW2: tl.constexpr,
                   PRELOAD: tl.constexpr, PICK: tl.constexpr, PDL: tl.constexpr):
    """Program (p, t): logits of experts p*BLOCK_E.. for token t (fp32 sums rounded to x's dtype, as the
    reference's matmul returns them). A program per token, not a loop over them: a token's dot products
    waited on the one before (the loop cost 2.5 us a token on H200: 22.4 us at 8 tokens); the T-fold weight
    reads come from L2 (the router is 1.3 MB). PICK: the last program to arrive reads all logits back and
    picks (else the consumer picks: the MoE pass 1 with router logits).
    PRELOAD (BLOCK_K >= K): the program's whole weight rows are loaded before it waits for its input
    (weights depend on no earlier kernel: with PDL the load overlaps the previous kernel)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_e.to(tl.int64) * K
    if PRELOAD:
        w_all = tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=e_mask[:, None] & (offs_k < K)[None, :],
                        other=0.0).to(tl.float32)
    pdl_enter(PDL)
    pdl_release(PDL)  # few programs at decode sizes (one wave): release at once
    x_row = x_ptr + t.to(tl.int64) * stride_x
    if PRELOAD:
        xv = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        acc = tl.sum(w_all * xv[None, :], axis=1)
    else:
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] + k[None, :], mask=e_mask[:, None] & (k < K)[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
    tl.store(logits_ptr + t * E + offs_e, acc.to(logits_ptr.dtype.element_ty), mask=e_mask)
    if PICK:
        if last_to_arrive(counter_ptr, tl.num_programs(0) * tl.num_programs(1)):
            offs = tl.arange(0, E_POW2)
            for u in range(0, T):  # .cg: the other programs' logits, past this SM's L1
                lg = tl.load(logits_ptr + u * E + offs, mask=offs < E, other=float("-inf"), cache_modifier=".cg")
                _pick_top_k(lg.to(tl.float32), offs, ids_ptr + u * TOP_K, scores_ptr + u * TOP_K, TOP_K, E_POW2)
            reset_arrivals(counter_ptr)


@triton.jit
def _pick_top_k(x, offs, ids_ptr, scores_ptr, TOP_K: tl.constexpr, E_POW2: tl.constexpr):
    for j in range(TOP_K):  # k rounds of argmax
        idx, best = argmax_lowest(x, offs, E_POW2)
        tl.store(ids_ptr + j, idx.to(tl.int64))
        tl.store(scores_ptr + j, sigmoid_score(best, scores_ptr.dtype.element_ty))
        x = tl.where(offs == idx, float("-inf"), x)


def router_triton(x: torch.Tensor, weight: torch.Tensor, top_k: int, block_e: int = 2, block_k: int = 1024,
                  preload: bool | None = None, pick: bool = True):
    """x [T, H] (T small), weight [E, H] -> top-k ids [T, k] (int64) and sigmoid scores [T, k] in x's dtype:
    what moe_router computes, in one launch instead of a cuBLAS GEMM plus the top-k kernel. block_e 2: 64
    programs read the 1.3 MB bf16 router of Maverick (128 x 5120). preload (default: where a program's
    rows are at most 16K elements, Maverick's 2 x 5120): load them whole before waiting for x. pick False:
    return the logits [T, E] only (the MoE pass 1 picks from them)."""
    T, H = x.shape
    E = weight.shape[0]
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)  # the reference multiplies in x's dtype
    logits = torch.empty((T, E), dtype=x.dtype, device=x.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=x.device)
    scores = torch.empty((T, top_k), dtype=x.dtype, device=x.device)
    if T == 0:
        return (ids, scores) if pick else logits
    if preload is None:
        preload = block_e * triton.next_power_of_2(H) <= 16384
    if preload:
        block_k = triton.next_power_of_2(H)
    counters = arrival_counters(x.device, 1, "router")
    _router_kernel[(triton.cdiv(E, block_e), T)](x, weight.contiguous(), logits, counters, ids, scores, T, E, H,
                                               x.stride(0), TOP_K=top_k, BLOCK_E=block_e, BLOCK_K=block_k,
                                               E_POW2=triton.next_power_of_2(E), PRELOAD=preload, PICK=pick,
                                               **pdl_launch(x.device), num_warps=4)
    return (ids, scores) if pick else logits
