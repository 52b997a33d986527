"""Min-latency MoE: the selected experts only, and the shared expert in the same two launches.

Pass 1 (FC13 + SwiGLU), one program per (BLOCK_N intermediate rows, source row): a source row is a
(token, chosen expert) pair, with input score * x (the router score scales the expert INPUT), or, with
a shared expert, a token's shared-expert row with input x. The input is quantized to FP8 with the static
input scale (ModelOpt) or per row on the fly (Meta FP8 experts), times that expert's gate and up rows;
writes silu(gate) * up. Pass 2 (FC2), one program per (BLOCK_N hidden rows, token): the token's chosen
experts and its shared expert, each with its own scales and rounded to the activation dtype as the
reference rounds them, summed in fp32; writes the FFN output [T, H].

Only the chosen experts' weights are read: at top-1, TP8, 1 token that is 15.7 MB (and 15.7 MB of
shared expert) instead of the 2 GB a dense loop over all 128 experts would stream. Fusing the shared
expert removes its two GEMM launches and the add (5 launches -> 2). Pairs routed to an expert another
rank holds (expert parallelism) contribute zeros.

The dot products run on CUDA cores (MODE 0: every FP8 weight converted e4m3 -> f16 -> f32, for each
token) or on the tensor cores: the FP8 input row repeated over
the 16 rows an MMA needs on its token side, times the weight tile (MODE 1: x W^T on mma.sync,
BLOCK_N >= 16; MODE 2: W x^T on wgmma, BLOCK_N >= 64), one row of the result kept; the repeated rows
cost tensor-core cycles only, which a GEMV has to spare. Pass 1 may split H over SPLIT_K programs (the
last to arrive applies SwiGLU), for the one-token case where 64-row tiles leave SMs idle. Which wins is
measured per token count (dispatch.DeviceTable.moe).
"""
import torch
import triton
import triton.language as tl

from .counters import arrival_counters, last_to_arrive, reset_arrivals
from .e4m3 import to_e4m3
from .fp8_gemm import _mma
from ..dispatch import table
from .pdl import pdl_enter, pdl_launch, pdl_release
from .router_pick import argmax_lowest, row_logits, sigmoid_score


@triton.jit
def _acc_zeros(BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    """The accumulator of BLOCK_N dot products: [BLOCK_N] on CUDA cores, an MMA tile with the tensor cores."""
    if MODE == 2:
        acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    elif MODE == 1:
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return acc


@triton.jit
def _dot_chunk(acc, x8, w, MODE: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + one K chunk of w [BLOCK_N, BLOCK_K] (e4m3) times x8 [BLOCK_K] (e4m3), exact products, fp32 sums."""
    if MODE == 0:
        acc += tl.sum(w.to(tl.float32) * x8.to(tl.float32)[None, :], axis=1)
    else:
        acc += _mma(tl.broadcast_to(x8[None, :], (16, BLOCK_K)), w, MODE == 2, BLOCK_K)
    return acc


@triton.jit
def _acc_row(acc, MODE: tl.constexpr):
    """[BLOCK_N] out of the accumulator: an MMA tile holds the same dot in each of its 16 token rows."""
    if MODE == 2:
        row = tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, acc, 0.0), axis=1)
    elif MODE == 1:
        row = tl.sum(tl.where(tl.arange(0, 16)[:, None] == 0, acc, 0.0), axis=0)
    else:
        row = acc
    return row


@triton.jit
def _fp8_scale(x_row, K, score, static_scale_ptr, SCALE_INPUT: tl.constexpr, DYNAMIC: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """The FP8 scale of (score *) x_row: per row, amax / 448 (DYNAMIC), else the static input scale."""
    if DYNAMIC:
        offs_k = tl.arange(0, BLOCK_K)
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            xv = tl.load(x_row + k, mask=k < K, other=0.0)
            if SCALE_INPUT:
                xv = (xv * score).to(x_row.dtype.element_ty)
            amax = tl.maximum(amax, tl.abs(xv.to(tl.float32)))
        return tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    return tl.load(static_scale_ptr)


@triton.jit
def _fc13_swiglu_kernel(
    x_ptr, ids_ptr, scores_ptr, w_ptr, w_scale_ptr, x_scale_ptr,  # routed experts
    sw_ptr, sw_scale_ptr, sx_scale_ptr,  # shared expert (gate_up [2Is, H], row scales, static input scale)
    out_ptr, partial_ptr, counter_ptr, logits_ptr,
    N_OUT, N_SHARED, K, K_PER_SPLIT, E_LOCAL, expert_offset, TOP_K, P, E,
    stride_we, stride_wn, stride_x, stride_o, scale_stride_e, scale_stride_n, shared_scale_stride_n,
    DYNAMIC_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
    SPLIT_K: tl.constexpr, FROM_LOGITS: tl.constexpr, E_POW2: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    row = tl.program_id(1)  # < P: a (token, k) pair; >= P: token row - P of the shared expert
    pid_k = tl.program_id(2)  # this program's share of H (SPLIT_K)
    shared = row >= P
    pair = tl.minimum(row, P - 1)
    token = tl.where(shared, row - P, pair // TOP_K)
    if FROM_LOGITS:  # top-1 of the router's logits, in every program (no pick step in the router's launch)
        lg, offs_e = row_logits(logits_ptr + pair * E, E, E_POW2)
        pick, best = argmax_lowest(lg, offs_e, E_POW2)
        top_score = sigmoid_score(best, scores_ptr.dtype.element_ty)
        if (pid_n == 0) & (pid_k == 0) & (row < P):  # for pass 2 (and the caller)
            tl.store(ids_ptr + pair, pick.to(tl.int64))
            tl.store(scores_ptr + pair, top_score)
        e = pick - expert_offset
    else:
        e = tl.load(ids_ptr + pair) - expert_offset
    local = shared | ((e >= 0) & (e < E_LOCAL))
    e = tl.where(local & ~shared, e, 0).to(tl.int64)
    n_out = tl.where(shared, N_SHARED, N_OUT)
    w_base = tl.where(shared, sw_ptr, w_ptr + e * stride_we)
    s_base = tl.where(shared, sw_scale_ptr, w_scale_ptr + e * scale_stride_e)
    s_step = tl.where(shared, shared_scale_stride_n, scale_stride_n)
    if FROM_LOGITS:
        score = tl.where(shared, 1.0, top_score.to(tl.float32))
    else:
        score = tl.where(shared, 1.0, tl.load(scores_ptr + pair).to(tl.float32))
    x_row = x_ptr + token.to(tl.int64) * stride_x
    if DYNAMIC_X:
        x_scale = tl.where(shared, tl.load(sx_scale_ptr),
                           _fp8_scale(x_row, K, score, x_scale_ptr, True, True, BLOCK_K))
    else:
        x_scale = tl.where(shared, tl.load(sx_scale_ptr), tl.load(x_scale_ptr))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n_out
    rows = offs_n.to(tl.int64) * stride_wn
    up_rows = rows + n_out.to(tl.int64) * stride_wn
    acc = _acc_zeros(BLOCK_N, MODE)
    acc_up = _acc_zeros(BLOCK_N, MODE)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        xv = tl.load(x_row + k, mask=k_mask, other=0.0)
        xv = (xv * score).to(x_ptr.dtype.element_ty)  # the reference rounds score * x to the input dtype
        x8 = to_e4m3(xv, x_scale)
        m = n_mask[:, None] & k_mask[None, :]
        w = tl.load(w_base + rows[:, None] + k[None, :], mask=m, other=0.0)
        acc = _dot_chunk(acc, x8, w, MODE, BLOCK_K)
        wu = tl.load(w_base + up_rows[:, None] + k[None, :], mask=m, other=0.0)
        acc_up = _dot_chunk(acc_up, x8, wu, MODE, BLOCK_K)
    pdl_release(PDL)
    acc = _acc_row(acc, MODE)
    acc_up = _acc_row(acc_up, MODE)
    if SPLIT_K == 1:
        _fc13_epilogue(acc, acc_up, x_scale, s_base, s_step, offs_n, n_mask, n_out, local, out_ptr, row, stride_o)
    else:  # partial sums [SPLIT_K, 2, rows, N]; the last split of this (row, column block) to arrive finishes
        rows_total = tl.num_programs(1)
        width = tl.num_programs(0) * BLOCK_N
        base = partial_ptr + ((pid_k * 2 * rows_total + row) * width).to(tl.int64) + offs_n
        tl.store(base, acc)
        tl.store(base + rows_total * width, acc_up)
        slot = counter_ptr + row * tl.num_programs(0) + pid_n
        if last_to_arrive(slot, SPLIT_K):
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in range(SPLIT_K):  # in split order: the same sums on every call
                part = partial_ptr + ((s * 2 * rows_total + row) * width).to(tl.int64) + offs_n
                acc += tl.load(part, cache_modifier=".cg")  # written by other programs: past L1
                acc_up += tl.load(part + rows_total * width, cache_modifier=".cg")
            _fc13_epilogue(acc, acc_up, x_scale, s_base, s_step, offs_n, n_mask, n_out, local, out_ptr, row,
                           stride_o)
            reset_arrivals(slot)


@triton.jit
def _fc13_epilogue(acc, acc_up, x_scale, s_base, s_step, offs_n, n_mask, n_out, local, out_ptr, row, stride_o):
    """silu(gate) * up of one source row's BLOCK_N columns, from the raw FP8 sums, to h."""
    ws = tl.load(s_base + offs_n * s_step, mask=n_mask, other=0.0)
    wsu = tl.load(s_base + (n_out + offs_n) * s_step, mask=n_mask, other=0.0)
    gate = acc * (x_scale * ws)
    y = gate / (1.0 + tl.exp(-gate)) * (acc_up * (x_scale * wsu))
    y = tl.where(local, y, 0.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_rows(x_row, x_scale, w_base, rows, n_mask, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               MODE: tl.constexpr):
    """fp32 dot of FP8-quantized x_row [K] with BLOCK_N FP8 weight rows (row offsets `rows`)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = _acc_zeros(BLOCK_N, MODE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        xv = tl.load(x_row + k, mask=k_mask, other=0.0)
        x8 = to_e4m3(xv, x_scale)
        w = tl.load(w_base + rows[:, None] + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = _dot_chunk(acc, x8, w, MODE, BLOCK_K)
    return _acc_row(acc, MODE)


@triton.jit
def _fc2_kernel(
    h_ptr, ids_ptr, w_ptr, w_scale_ptr, x_scale_ptr,  # routed experts' down [E, H, I]
    sw_ptr, sw_scale_ptr, sx_scale_ptr,  # shared expert's down [H, Is], scalar scales
    out_ptr,
    logits_ptr, N_OUT, K, K_SHARED, E_LOCAL, expert_offset, TOP_K, P, E,
    stride_we, stride_wn, stride_swn, stride_h, stride_o, scale_stride_e, scale_stride_n,
    HAS_SHARED: tl.constexpr, DYNAMIC_X: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MODE: tl.constexpr, FROM_LOGITS: tl.constexpr, E_POW2: tl.constexpr, PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    token = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_OUT
    if FROM_LOGITS:  # top-1 from the router's logits, as pass 1 picks it, before the PDL wait (the router
        lg, offs_e = row_logits(logits_ptr + token * E, E, E_POW2)  # ran two kernels back: a kernel launches
        pick = argmax_lowest(lg, offs_e, E_POW2)[0] - expert_offset  # once the one before it passed its
    pdl_enter(PDL)  # main loop), so no load of pass 1's ids stands between the wait and the weights
    dtype = out_ptr.dtype.element_ty
    routed = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, TOP_K):
        pair = token * TOP_K + j
        if FROM_LOGITS:
            e = pick
        else:
            e = tl.load(ids_ptr + pair) - expert_offset
        local = (e >= 0) & (e < E_LOCAL)
        e = tl.where(local, e, 0).to(tl.int64)
        h_row = h_ptr + pair.to(tl.int64) * stride_h
        x_scale = _fp8_scale(h_row, K, 1.0, x_scale_ptr, False, DYNAMIC_X, BLOCK_K)
        acc = _gemv_rows(h_row, x_scale, w_ptr + e * stride_we, offs_n.to(tl.int64) * stride_wn, n_mask, K,
                         BLOCK_N, BLOCK_K, MODE)
        ws = tl.load(w_scale_ptr + e * scale_stride_e + offs_n * scale_stride_n, mask=n_mask, other=0.0)
        y = tl.where(local, acc * (x_scale * ws), 0.0)
        routed += y.to(dtype).to(tl.float32)  # the reference rounds each expert's output, sums in fp32
    out = routed.to(dtype)
    if HAS_SHARED:
        h_row = h_ptr + (P + token).to(tl.int64) * stride_h
        x_scale = tl.load(sx_scale_ptr)
        acc = _gemv_rows(h_row, x_scale, sw_ptr, offs_n.to(tl.int64) * stride_swn, n_mask, K_SHARED,
                         BLOCK_N, BLOCK_K, MODE)
        shared = (acc * (x_scale * tl.load(sw_scale_ptr))).to(dtype)
        out = (out.to(tl.float32) + shared.to(tl.float32)).to(dtype)  # shared_expert(x) + routed
    pdl_release(PDL)
    tl.store(out_ptr + token.to(tl.int64) * stride_o + offs_n, out, mask=n_mask)


_MIN_BLOCK_N = {0: 1, 1: 16, 2: 64}  # an MMA's weight side: mma.sync n >= 16 in Triton, wgmma m = 64


def _pass_config(cfg: tuple, pass_: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps[, num_stages[, MODE[, SPLIT_K]]]) -> all six (defaults: 3 stages, CUDA
    cores, no split). Only pass 1 splits K."""
    block_n, block_k, num_warps, *rest = cfg
    stages, mode, split_k = (list(rest) + [3, 0, 1][len(rest):])[:3]
    if mode not in _MIN_BLOCK_N or block_n < _MIN_BLOCK_N[mode] or (mode and block_k < 32):
        raise ValueError(f"moe_gemv config {cfg}: MODE must be 0 (CUDA cores), 1 (mma.sync, BLOCK_N >= 16) "
                         "or 2 (wgmma, BLOCK_N >= 64), with BLOCK_K >= 32 for an MMA")
    if split_k < 1 or (pass_ == 2 and split_k != 1):
        raise ValueError(f"moe_gemv config {cfg}: SPLIT_K must be >= 1 in pass 1 and 1 in pass 2")
    return block_n, block_k, num_warps, stages, mode, split_k


def _scale_strides(scale: torch.Tensor) -> tuple[int, int]:
    """(per expert, per row) strides of a weight scale: 0, 0 for one scalar; [E, N] per channel."""
    return (0, 0) if scale.numel() == 1 else (scale.stride(0), scale.stride(1))


def moe_experts_gemv(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor, gate_up: torch.Tensor,
                     down: torch.Tensor, expert_offset: int, gate_up_scale: torch.Tensor,
                     gate_up_input_scale: torch.Tensor | None, down_scale: torch.Tensor,
                     down_input_scale: torch.Tensor | None, shared: tuple | None = None,
                     config: tuple | None = None, router_logits: torch.Tensor | None = None) -> torch.Tensor:
    """config: (BLOCK_N, BLOCK_K, num_warps[, num_stages[, MODE[, SPLIT_K]]]) for both passes, or a pair of
    them (pass 1, pass 2); MODE 0 CUDA cores, 1 mma.sync, 2 wgmma (module docstring); SPLIT_K (pass 1 only)
    splits the hidden size over that many programs, the last to arrive applies SwiGLU.
    Routed experts for FP8 weights (gate_up [E, 2I, H], down [E, H, I]; scales scalars with static input
    scales, or [E, N] with None: per row), plus, if given, the shared expert
    shared = (gate_up [2Is, H], its row scales [2Is] or scalar, input scale, down [H, Is], scale, input scale)
    (FP8, static input scales). Returns [T, H] in x's dtype: routed (+ shared).
    router_logits [T, E] (top-1 only): pass 1 picks each token's expert and score from them (in every program,
    so the router's launch needs no pick step) and writes them to top_ids, top_scores [T, 1]; pass 2 picks the
    same expert from them again, before its PDL wait."""
    config = config or table(x.device).moe_config(x.shape[0])
    first, second = config if isinstance(config[0], tuple) else (config, config)
    (block_n, block_k, num_warps, stages, mode, split_k), (block_n2, block_k2, num_warps2, stages2, mode2, _) = \
        _pass_config(first, 1), _pass_config(second, 2)
    T, H = x.shape
    k = top_ids.shape[1]
    P = T * k
    from_logits = router_logits is not None
    if from_logits:
        assert k == 1 and top_ids.is_contiguous() and top_scores.is_contiguous(), \
            "router logits: top-1, with contiguous top_ids / top_scores [T, 1] to fill"
        E = router_logits.shape[1]
    else:
        router_logits, E = top_scores, 1  # never read
    ids = top_ids.reshape(-1).contiguous()
    scores = top_scores.reshape(-1).contiguous()
    I = gate_up.shape[1] // 2
    dynamic = gate_up_input_scale is None
    if shared is not None:
        sgu, sgu_scale, sgu_in, sdn, sdn_scale, sdn_in = shared
        Is = sgu.shape[0] // 2
    else:  # the shared slots point at the routed tensors and are never launched
        sgu, sgu_scale, sgu_in, sdn, sdn_scale, sdn_in, Is = gate_up, gate_up_scale, gate_up_scale, down, \
            down_scale, down_scale, 0
    rows = P + (T if shared is not None else 0)
    h = torch.empty((rows, max(I, Is)), dtype=x.dtype, device=x.device)
    se, sn = _scale_strides(gate_up_scale)
    grid = (triton.cdiv(max(I, Is), block_n), rows, split_k)
    k_per_split = triton.cdiv(triton.cdiv(H, split_k), block_k) * block_k
    if split_k > 1:
        partial = torch.empty((split_k, 2, rows, grid[0] * block_n), dtype=torch.float32, device=x.device)
        counters = arrival_counters(x.device, grid[0] * rows, "moe_fc13")
    else:
        partial = counters = h  # never touched
    _fc13_swiglu_kernel[grid](
        x, ids, scores, gate_up, gate_up_scale, gate_up_scale if dynamic else gate_up_input_scale,
        sgu, sgu_scale, sgu_in, h, partial, counters, router_logits, I, Is, H, k_per_split, gate_up.shape[0],
        expert_offset, k, P, E, gate_up.stride(0), gate_up.stride(1), x.stride(0), h.stride(0), se, sn,
        0 if sgu_scale.numel() == 1 else 1, DYNAMIC_X=dynamic, BLOCK_N=block_n, BLOCK_K=block_k, MODE=mode,
        SPLIT_K=split_k, FROM_LOGITS=from_logits, E_POW2=triton.next_power_of_2(E), **pdl_launch(x.device),
        num_warps=num_warps, num_stages=stages)
    out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    se, sn = _scale_strides(down_scale)
    _fc2_kernel[(triton.cdiv(H, block_n2), T)](
        h, ids, down, down_scale, down_scale if dynamic else down_input_scale, sdn, sdn_scale, sdn_in, out,
        router_logits, H, I, Is, down.shape[0], expert_offset, k, P, E, down.stride(0), down.stride(1), sdn.stride(0),
        h.stride(0), out.stride(0), se, sn, HAS_SHARED=shared is not None, DYNAMIC_X=dynamic, BLOCK_N=block_n2,
        BLOCK_K=block_k2, MODE=mode2, FROM_LOGITS=from_logits, E_POW2=triton.next_power_of_2(E), **pdl_launch(x.device), num_warps=num_warps2, num_stages=stages2)
    return out
