"""FlashAttention-style paged attention for many new tokens per sequence (prefill, chunked prefill).

Same semantics as the reference `paged_attention`: each new token attends to the cached context
(read before this step's write; ring positions on chunked local layers) and to this step's keys up
to itself, within its chunk on local layers. Grid (sequence, query head, block of BLOCK_M new
tokens); each program streams K/V tiles with an online softmax, so nothing of size
new tokens x context is ever materialized (the reference builds [heads, Q, ctx + Q] scores: 1.3 GB
for one rank's 8K prompt at TP8).

Precondition (the runtime's batches always meet it): a sequence's new tokens sit at consecutive
positions ctx, ctx + 1, ... in q_index order; the loop bounds over this step's keys rely on it
(causal: keys up to the block's last query; local: from the chunk start of its first query).
Masks still check every position, so padding rows (position -1) see nothing.
"""
import torch
import triton
import triton.language as tl

from .attention_tiles import cache_tile, new_tile, online_softmax_tile, visible


@triton.jit(do_not_specialize=["Q", "NBT"])  # any chunk length and table width: one compile, not one per class
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, table_ptr, ctx_ptr, qidx_ptr, qpos_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
    Q, NBT, CHUNK, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KV: tl.constexpr, LOCAL: tl.constexpr, FP8: tl.constexpr, BF16_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    h = hq // GROUP  # GQA: this query head's kv head
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < Q
    offs_d = tl.arange(0, HEAD_DIM)
    tok = tl.load(qidx_ptr + b * Q + rows, mask=row_ok, other=0).to(tl.int64)
    qpos = tl.load(qpos_ptr + b * Q + rows, mask=row_ok, other=-1)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + hq * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0).to(tl.float32)
    ctx = tl.load(ctx_ptr + b)
    k_scale = tl.load(k_scale_ptr) if FP8 else 1.0
    v_scale = tl.load(v_scale_ptr) if FP8 else 1.0
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)

    # a block of padding rows only (a prompt chunk padded up to a CUDA graph's size) reads nothing
    live = tl.max(qpos) >= 0
    # 1. the cached context, one cache block per tile (a local layer's table is a ring of NBT blocks)
    for t0 in range(0, tl.where(live, tl.minimum(ctx, NBT * BLOCK_KV), 0), BLOCK_KV):
        k, v, kpos, valid = cache_tile(kc_ptr, vc_ptr, table_ptr, b, NBT, t0, h, ctx, stride_cs, stride_ch, offs_d,
                                       k_scale, v_scale, CHUNK, BLOCK_KV, LOCAL, FP8)
        vis = valid[None, :] & visible(kpos, qpos, CHUNK, LOCAL)
        m_i, l_i, acc = online_softmax_tile(q, k, v, vis, m_i, l_i, acc, sm_scale, BF16_DOT)

    # 2. this step's keys: causal, so only up to the block's last row; local: from its chunk start
    pos0 = tl.load(qpos_ptr + b * Q)  # position of new token 0 (token j sits at pos0 + j)
    j_lo = 0
    if LOCAL:
        first = tl.load(qpos_ptr + b * Q + m0)
        j_lo = tl.maximum(first // CHUNK * CHUNK - pos0, 0) // BLOCK_N * BLOCK_N
    j_hi = tl.where(live, tl.minimum(m0 + BLOCK_M, Q), 0)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        k, v, kpos = new_tile(k_ptr, v_ptr, qidx_ptr, qpos_ptr, b, Q, j0 + tl.arange(0, BLOCK_N), h, stride_kt,
                              stride_kh, stride_vt, stride_vh, offs_d, k_scale, v_scale, FP8)
        vis = visible(kpos, qpos, CHUNK, LOCAL)
        m_i, l_i, acc = online_softmax_tile(q, k, v, vis, m_i, l_i, acc, sm_scale, BF16_DOT)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    ok = row_ok & (qpos >= 0)  # padding rows are not written
    tl.store(out_ptr + tok[:, None] * stride_ot + hq * stride_oh + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok[:, None])


def prefill_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, scale: float,
                      chunk_size: int | None, k_scale=None, v_scale=None, block_m: int = 64, block_n: int = 64):
    """Arguments as maverick_plugins.paged_attention (token_to_padded is implied by q_index)."""
    T, H, D = q.shape
    B, Q = q_index.shape
    kvh = k.shape[1]
    bs = k_cache.shape[1]
    assert bs >= 16 and bs & (bs - 1) == 0, f"block size {bs}: expected a power of two >= 16"
    assert D & (D - 1) == 0 and D >= 16, f"head_dim {D}: expected a power of two >= 16"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "q, k, v need a contiguous head_dim"
    block_m = min(block_m, max(16, triton.next_power_of_2(Q)))
    block_n = min(block_n, max(16, triton.next_power_of_2(Q)))
    kc = k_cache.view(-1, kvh, D)
    vc = v_cache.view(-1, kvh, D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    # rows of tokens outside q_index stay unwritten. Eager, every token is in q_index; a CUDA graph's padding
    # tokens are not, and their rows flow on through the layer's (row-wise) ops: zeros, not stale memory
    out = torch.zeros_like(q) if q.is_cuda and torch.cuda.is_current_stream_capturing() else torch.empty_like(q)
    _prefill_kernel[(B, H, triton.cdiv(Q, block_m))](
        q, k, v, kc, vc, block_table, ctx_lens, q_index, q_positions,
        k_scale if fp8 else ctx_lens, v_scale if fp8 else ctx_lens, out,
        Q, block_table.shape[1], chunk_size or 1, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1),
        out.stride(0), out.stride(1),
        GROUP=H // kvh, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KV=bs,
        LOCAL=chunk_size is not None, FP8=fp8, BF16_DOT=q.dtype == torch.bfloat16, num_warps=4)
    return out
