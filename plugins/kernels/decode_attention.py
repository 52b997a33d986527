"""Split-KV paged attention for a few new tokens per sequence (decode, speculative verify).

Same semantics as the reference `paged_attention`: this step's queries attend to the cached context
(read before this step's write; ring positions on chunked local layers) plus this step's own keys.
Pass 1, grid (sequence, kv head, split): each split streams its share of the context's blocks (or,
for the last split, the step's new keys) with an online softmax, for all query heads of the kv head
at once (GQA: 5 heads at TP8, padded to 16 rows for tl.dot), and writes (max, sum, acc). Splitting
the context is what fills the card: at 8K context one rank's layer is 2 MB, 8 kv-head programs
would use 8 of 132 SMs. Pass 2 merges the partials.
"""
import torch
import triton
import triton.language as tl

from ..dispatch import PDL, PDL_LAUNCH
from .pdl import pdl_enter
from .attention_tiles import cache_tile, new_tile, online_softmax_tile, visible

NUM_SMS = 132  # H100/H200; only sets how finely the context is split
SPLIT_MIN_BLOCKS = 1  # H200, TP8 shapes: 16 splits best at 1K context (16 us vs 21 us with 8)


@triton.jit
def _partial_kernel(
    # tensors
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, table_ptr, ctx_ptr, qidx_ptr, qpos_ptr, k_scale_ptr, v_scale_ptr,
    m_out, l_out, acc_out,
    # sizes and strides
    Q, NBT, SPLIT_LEN, CHUNK, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    # meta
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr, NUM_SPLITS: tl.constexpr, LOCAL: tl.constexpr, FP8: tl.constexpr,
    BF16_DOT: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n_kvh = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_R)
    j = rows // GROUP
    g = rows % GROUP
    row_ok = j < Q
    offs_d = tl.arange(0, HEAD_DIM)
    tok = tl.load(qidx_ptr + b * Q + j, mask=row_ok, other=0).to(tl.int64)
    qpos = tl.load(qpos_ptr + b * Q + j, mask=row_ok, other=-1)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + (h * GROUP + g)[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    ctx = tl.load(ctx_ptr + b)
    k_scale = tl.load(k_scale_ptr) if FP8 else 1.0
    v_scale = tl.load(v_scale_ptr) if FP8 else 1.0
    m_i = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
    if s < NUM_SPLITS:  # a slice of the cached context
        start = s * SPLIT_LEN
        # a local layer's table is a ring of NBT blocks: context beyond it lives in those same slots
        end = tl.minimum(tl.minimum(start + SPLIT_LEN, ctx), NBT * BLOCK_KV)
        for t0 in range(start, end, BLOCK_KV):
            k, v, kpos, valid = cache_tile(kc_ptr, vc_ptr, table_ptr, b, NBT, t0, h, ctx, stride_cs, stride_ch, offs_d,
                                           k_scale, v_scale, CHUNK, BLOCK_KV, LOCAL, FP8)
            vis = valid[None, :] & visible(kpos, qpos, CHUNK, LOCAL)
            m_i, l_i, acc = online_softmax_tile(q, k, v, vis, m_i, l_i, acc, sm_scale, BF16_DOT)
    else:  # this step's own keys
        k, v, kpos = new_tile(k_ptr, v_ptr, qidx_ptr, qpos_ptr, b, Q, tl.arange(0, BLOCK_Q), h, stride_kt, stride_kh,
                              stride_vt, stride_vh, offs_d, k_scale, v_scale, FP8)
        vis = visible(kpos, qpos, CHUNK, LOCAL)
        sc = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
        sc = tl.where(vis, sc, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(sc, axis=1))
        p = tl.exp(sc - m_i[:, None])
        l_i = tl.sum(p, axis=1)
        acc = tl.dot(p, v, input_precision="ieee")
    # splits past this sequence's context did no work: they store nothing and the merge skips them
    if (s == NUM_SPLITS) | (s * SPLIT_LEN < tl.minimum(ctx, NBT * BLOCK_KV)):
        base = ((b * n_kvh + h) * (NUM_SPLITS + 1) + s).to(tl.int64) * BLOCK_R
        tl.store(m_out + base + rows, m_i)
        tl.store(l_out + base + rows, l_i)
        tl.store(acc_out + (base + rows)[:, None] * HEAD_DIM + offs_d[None, :], acc)


@triton.jit
def _combine_kernel(
    m_in, l_in, acc_in, qidx_ptr, qpos_ptr, ctx_ptr, out_ptr,
    Q, NBT, SPLIT_LEN, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, NUM_PARTS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_KV: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    n_kvh = tl.num_programs(1)
    rows = tl.arange(0, BLOCK_R)
    j = rows // GROUP
    g = rows % GROUP
    row_ok = j < Q
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # slices of head_dim merge in parallel
    base = ((b * n_kvh + h) * NUM_PARTS).to(tl.int64) * BLOCK_R
    # only the splits that held context (cost follows the context, not max_seq_len), then the new keys
    ctx = tl.minimum(tl.load(ctx_ptr + b), NBT * BLOCK_KV)
    n_active = (ctx + SPLIT_LEN - 1) // SPLIT_LEN
    last = base + (NUM_PARTS - 1) * BLOCK_R
    m_max = tl.load(m_in + last + rows)
    for s in range(0, n_active):
        m_max = tl.maximum(m_max, tl.load(m_in + base + s * BLOCK_R + rows))
    w = tl.exp(tl.load(m_in + last + rows) - m_max)
    l_sum = tl.load(l_in + last + rows) * w
    acc = tl.load(acc_in + (last + rows)[:, None] * HEAD_DIM + offs_d[None, :]) * w[:, None]
    for s in range(0, n_active):
        w = tl.exp(tl.load(m_in + base + s * BLOCK_R + rows) - m_max)
        l_sum += tl.load(l_in + base + s * BLOCK_R + rows) * w
        acc += tl.load(acc_in + (base + s * BLOCK_R + rows)[:, None] * HEAD_DIM + offs_d[None, :]) * w[:, None]
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    row_ok = row_ok & (tl.load(qpos_ptr + b * Q + j, mask=row_ok, other=-1) >= 0)  # skip padding rows
    tok = tl.load(qidx_ptr + b * Q + j, mask=row_ok, other=0).to(tl.int64)
    tl.store(out_ptr + tok[:, None] * stride_ot + (h * GROUP + g)[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def decode_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, scale: float,
                     chunk_size: int | None, k_scale=None, v_scale=None, num_splits: int | None = None):
    """Arguments as maverick_plugins.paged_attention (token_to_padded is implied by q_index).
    Every token of the step must appear in q_index (padding rows have q_positions -1)."""
    T, H, D = q.shape
    B, Q = q_index.shape
    kvh = k.shape[1]
    group = H // kvh
    bs = k_cache.shape[1]
    nbt = block_table.shape[1]
    assert bs >= 16 and bs & (bs - 1) == 0, f"block size {bs}: expected a power of two >= 16"
    assert D & (D - 1) == 0, f"head_dim {D}: expected a power of two"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "q, k, v need a contiguous head_dim"
    if num_splits is None:  # enough programs to cover the SMs, at least SPLIT_MIN_BLOCKS blocks each
        num_splits = max(1, min(triton.cdiv(nbt, SPLIT_MIN_BLOCKS), triton.cdiv(NUM_SMS, B * kvh)))
    split_len = triton.cdiv(nbt, num_splits) * bs
    block_r = max(16, triton.next_power_of_2(Q * group))
    block_q = max(16, triton.next_power_of_2(Q))
    parts = num_splits + 1
    m = torch.empty((B, kvh, parts, block_r), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((B, kvh, parts, block_r, D), dtype=torch.float32, device=q.device)
    kc = k_cache.view(-1, kvh, D)
    vc = v_cache.view(-1, kvh, D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    dummy = ctx_lens
    _partial_kernel[(B, kvh, parts)](
        q, k, v, kc, vc, block_table, ctx_lens, q_index, q_positions,
        k_scale if fp8 else dummy, v_scale if fp8 else dummy, m, l, acc,
        Q, nbt, split_len, chunk_size or 1, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1),
        GROUP=group, HEAD_DIM=D, BLOCK_R=block_r, BLOCK_KV=bs, BLOCK_Q=block_q, NUM_SPLITS=num_splits,
        LOCAL=chunk_size is not None, FP8=fp8, BF16_DOT=q.dtype == torch.bfloat16, PDL=PDL, **PDL_LAUNCH, num_warps=4)
    out = torch.empty_like(q)  # rows of tokens outside q_index (graph padding) stay unwritten: never read
    block_d = min(D, 32)
    _combine_kernel[(B, kvh, D // block_d)](m, l, acc, q_index, q_positions, ctx_lens, out, Q, nbt, split_len,
                                            out.stride(0), out.stride(1), GROUP=group, HEAD_DIM=D, BLOCK_R=block_r,
                                            NUM_PARTS=parts, BLOCK_D=block_d, BLOCK_KV=bs,
                                            PDL=PDL, **PDL_LAUNCH, num_warps=4)
    return out
