"""Split-KV paged attention for a few new tokens per sequence (decode, speculative verify).

Same semantics as the reference `paged_attention`: this step's queries attend to the cached context
(read before this step's write; ring positions on chunked local layers) plus this step's own keys.
Grid (sequence, kv head, split): each split streams its share of the context's blocks with an online
softmax for all query heads of the kv head at once (GQA: 5 heads at TP8, padded to 16 rows for tl.dot);
one extra program per (sequence, kv head) takes the step's own keys. Splitting is what fills the card:
at 8K context one rank's layer is 2 MB, 8 kv-head programs would use 8 of 132 SMs.

The split length follows each sequence's context on the device (no host sync, graph-capturable): a
graph captured for max_seq_len 128K still splits a 1K context into 1-block pieces instead of leaving
it to one program; on chunked local layers only the current chunk's slots are read. Each program writes
(max, sum, acc) for the real rows only; a second launch merges them, BLOCK_D columns of head_dim a
program (all of a slice's partials loaded as one [parts, rows, BLOCK_D] tile per step).

At one new token a sequence the kernel may also take the raw QKV output (`post`): every program applies
RoPE / QK-norm / the temperature to the q rows it loads, the new-key program to its k rows, and that program
writes the new k and v to the cache too (maverick_plugins/qkv_attention.py): no qkv_post launch.

Measured on H200 at TP8 shapes (FP8 cache, us): a merge by the last program to finish
(an arrival counter instead of the second launch) was slower everywhere (1K context: 14.1-16.9 against
8.5; 128K: 92.9 against 37.1), as was merging whole rows per program (BLOCK_D 128: 17.0 at 1K).
"""
import torch
import triton
import triton.language as tl

from ..dispatch import sm_count, table
from .attention_tiles import as_cached, cache_tile, new_rows, online_softmax_tile, visible
from .e4m3 import to_e4m3
from .pdl import pdl_enter, pdl_launch, pdl_release
from .qk_rows import load_qk_rows, temperature

MERGE_TILE = 8192  # fp32 elements of partial output one merge step loads (64 registers a thread at 4 warps)
MERGE_BLOCK_D = 32  # head_dim columns a merge program takes (4 programs per kv head at head_dim 128)
# Runtime sizes, not specialized: an eager step's table width (its longest sequence's blocks) and split count
# (from that width and the batch) take any of 1..max_splits values, and as constexprs or specialized integers
# each new one would compile a kernel in the middle of serving (decode and merge kernels were 8 of the 11
# compiles while serving in `maverick-bench compiles` on H100 at 72da23b).
SIZE_ARGS = ["NBT", "NUM_SPLITS"]


@triton.jit
def _splits(ctx, NBT, CHUNK, NUM_SPLITS, BLOCK_KV: tl.constexpr, LOCAL: tl.constexpr):
    """(slots to read, split length, splits holding context) for a sequence with ctx cached tokens."""
    if LOCAL:  # this step's queries sit at positions >= ctx: of the ring only the current chunk's
        span = ctx % CHUNK  # slots 0 .. ctx % C - 1 can be visible (the rest hold the previous chunk)
    else:
        span = ctx
    span = tl.minimum(span, NBT * BLOCK_KV)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(span, NUM_SPLITS), BLOCK_KV), 1) * BLOCK_KV
    return span, split_len, tl.cdiv(span, split_len)  # the new keys' partial goes after the active splits


@triton.jit(do_not_specialize=SIZE_ARGS)
def _decode_kernel(
    # tensors
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, table_ptr, ctx_ptr, qidx_ptr, qpos_ptr, k_scale_ptr, v_scale_ptr,
    cos_ptr, sin_ptr, slot_ptr, m_buf, l_buf, acc_buf,
    # sizes, strides, qkv_post's scalars
    Q, NBT, CHUNK, NUM_SPLITS, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
    eps, floor_scale, attn_scale,
    # meta
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr, BLOCK_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr, LOCAL: tl.constexpr, FP8: tl.constexpr,
    BF16_DOT: tl.constexpr, USE_ROPE: tl.constexpr, QK_NORM: tl.constexpr, TEMPERATURE: tl.constexpr,
    CACHE: tl.constexpr, PDL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    bh = b * tl.num_programs(1) + h
    rows = tl.arange(0, BLOCK_R)
    j = rows // GROUP
    g = rows % GROUP
    row_ok = j < Q
    offs_d = tl.arange(0, HEAD_DIM)
    # Before the wait: the step's inputs (copied in before its first kernel, written by none) and the scales,
    # so after it only q (and the cache, whose table entry no longer waits for the context length) is read.
    tok = tl.load(qidx_ptr + b * Q + j, mask=row_ok, other=0).to(tl.int64)
    qpos = tl.load(qpos_ptr + b * Q + j, mask=row_ok, other=-1)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)  # int32 or int64 tensors alike
    span, split_len, n_active = _splits(ctx, NBT, CHUNK, NUM_SPLITS, BLOCK_KV, LOCAL)
    k_scale = tl.load(k_scale_ptr) if FP8 else 1.0
    v_scale = tl.load(v_scale_ptr) if FP8 else 1.0
    pdl_enter(PDL)
    dt = q_ptr.dtype.element_ty
    # q as qkv_post would return it (RoPE, QK-norm, temperature: each a no-op when its flag is off)
    q = load_qk_rows(q_ptr + tok * stride_qt + (h * GROUP + g) * stride_qh, tok, row_ok, cos_ptr, sin_ptr, eps,
                     offs_d, dt, HEAD_DIM, USE_ROPE, QK_NORM)
    if TEMPERATURE:
        q = (q * temperature(qpos, floor_scale, attn_scale)[:, None]).to(dt).to(tl.float32)
    m_i = tl.full((BLOCK_R,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
    if s < NUM_SPLITS:  # a slice of the cached context (empty past n_active)
        part = s
        start = s * split_len
        for t0 in range(start, tl.minimum(start + split_len, span), BLOCK_KV):
            k, v, kpos, valid = cache_tile(kc_ptr, vc_ptr, table_ptr, b, NBT, t0, h, ctx, stride_cs, stride_ch, offs_d,
                                           k_scale, v_scale, CHUNK, BLOCK_KV, LOCAL, FP8)
            vis = valid[None, :] & visible(kpos, qpos, CHUNK, LOCAL)
            m_i, l_i, acc = online_softmax_tile(q, k, v, vis, m_i, l_i, acc, sm_scale, BF16_DOT)
    else:  # this step's own keys
        part = n_active
        ktok, kpos, jj_ok = new_rows(qidx_ptr, qpos_ptr, b, Q, tl.arange(0, BLOCK_Q))
        k = load_qk_rows(k_ptr + ktok * stride_kt + h * stride_kh, ktok, jj_ok, cos_ptr, sin_ptr, eps, offs_d, dt,
                         HEAD_DIM, USE_ROPE, QK_NORM)
        v = tl.load(v_ptr + ktok[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=jj_ok[:, None],
                    other=0.0).to(tl.float32)
        if CACHE:  # one new token a sequence: its slot is none of those the splits read (see decode_attention)
            slot = tl.load(slot_ptr + ktok, mask=jj_ok, other=0).to(tl.int64)
            dst = slot[:, None] * stride_cs + h * stride_ch + offs_d[None, :]
            k8 = to_e4m3(k, k_scale) if FP8 else k
            v8 = to_e4m3(v, v_scale) if FP8 else v
            real = (jj_ok & (kpos >= 0))[:, None]  # graph-padding sequences' rows point at token 0: skip them
            tl.store(kc_ptr + dst, k8.to(kc_ptr.dtype.element_ty), mask=real)
            tl.store(vc_ptr + dst, v8.to(vc_ptr.dtype.element_ty), mask=real)
        k = as_cached(k, k_scale, FP8)  # attend to the keys exactly as the cache holds them
        v = as_cached(v, v_scale, FP8)
        vis = visible(kpos, qpos, CHUNK, LOCAL)
        sc = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
        sc = tl.where(vis, sc, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(sc, axis=1))
        p = tl.exp(sc - m_i[:, None])
        l_i = tl.sum(p, axis=1)
        acc = tl.dot(p, v, input_precision="ieee")
    pdl_release(PDL)
    if part <= n_active:  # idle splits store nothing; the merge reads parts 0 .. n_active
        base = (bh * (NUM_SPLITS + 1) + part).to(tl.int64) * ROWS
        keep = rows < Q * GROUP  # padding rows of the tl.dot tile are not stored
        tl.store(m_buf + base + rows, m_i, mask=keep)
        tl.store(l_buf + base + rows, l_i, mask=keep)
        tl.store(acc_buf + (base + rows)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=keep[:, None])


@triton.jit(do_not_specialize=SIZE_ARGS)
def _merge_kernel(m_buf, l_buf, acc_buf, out_ptr, qidx_ptr, qpos_ptr, ctx_ptr, Q, NBT, CHUNK, NUM_SPLITS,
                  stride_ot, stride_oh,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                  BLOCK_KV: tl.constexpr, MERGE_PARTS: tl.constexpr, LOCAL: tl.constexpr,
                  PDL: tl.constexpr):
    """Grid (sequence, kv head, head_dim / BLOCK_D): softmax-merge the partials of (sequence b, kv head h),
    head_dim columns d, MERGE_PARTS parts at a time as one [parts, rows, BLOCK_D] tile (independent loads
    in flight together), and store those output columns."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    bh = b * tl.num_programs(1) + h
    # before the wait: the step's inputs (as in the split kernel), so that after it only the partials are read
    _, _, n_active = _splits(tl.load(ctx_ptr + b).to(tl.int32), NBT, CHUNK, NUM_SPLITS, BLOCK_KV, LOCAL)
    n_parts = n_active + 1  # the active splits, then the new keys
    r = tl.arange(0, ROWS)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    pp = tl.arange(0, MERGE_PARTS)
    r_ok = r < Q * GROUP
    j = r // GROUP
    g = r % GROUP
    real = r_ok & (tl.load(qpos_ptr + b * Q + j, mask=r_ok, other=-1) >= 0)  # padding rows keep their memory
    tok = tl.load(qidx_ptr + b * Q + j, mask=real, other=0).to(tl.int64)
    pdl_enter(PDL)
    pdl_release(PDL)  # few programs at decode sizes (one wave): release at once
    m_run = tl.full((ROWS,), -1.0e30, dtype=tl.float32)
    l_run = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for p0 in range(0, n_parts, MERGE_PARTS):
        p = p0 + pp
        ok = (p < n_parts)[:, None] & r_ok[None, :]  # [parts, rows]
        idx = (bh * (NUM_SPLITS + 1) + p).to(tl.int64)[:, None] * ROWS + r[None, :]
        m = tl.load(m_buf + idx, mask=ok, other=-1.0e30)
        lp = tl.load(l_buf + idx, mask=ok, other=0.0)
        a = tl.load(acc_buf + idx[:, :, None] * HEAD_DIM + d[None, None, :], mask=ok[:, :, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        w = tl.exp(m - m_new[None, :])
        alpha = tl.exp(m_run - m_new)
        l_run = l_run * alpha + tl.sum(lp * w, axis=0)
        acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], axis=0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + (h * GROUP + g)[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None])


def decode_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, scale: float,
                     chunk_size: int | None, k_scale=None, v_scale=None, num_splits: int | None = None,
                     post: tuple | None = None, slots: torch.Tensor | None = None):
    """Arguments as maverick_plugins.paged_attention (token_to_padded is implied by q_index).
    Every token of the step must appear in q_index (padding rows have q_positions -1); real rows'
    positions are at least their sequence's ctx_lens (new tokens follow the cached context). With PDL both
    kernels read ctx_lens, q_index and q_positions before waiting for the previous kernel: they must not be
    that kernel's outputs (in the model they are the step's inputs, copied in before its first kernel).

    post = (cos, sin, use_rope, qk_norm, eps, temperature): q and k are the raw QKV output's views, and the
    kernel applies what qkv_post would (RoPE, QK-norm, the temperature (floor_scale, attn_scale) or None).
    slots [T]: also write this step's k and v to these cache slots (as kv_cache_write does), from the
    programs that take the new keys; only with one new token a sequence, whose slot (p, or p % C in a
    local ring, which held p - C) none of the splits reads."""
    T, H, D = q.shape
    B, Q = q_index.shape
    kvh = k.shape[1]
    group = H // kvh
    bs = k_cache.shape[1]
    nbt = block_table.shape[1]
    assert bs >= 16 and bs & (bs - 1) == 0, f"block size {bs}: expected a power of two >= 16"
    assert D & (D - 1) == 0, f"head_dim {D}: expected a power of two"
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "q, k, v need a contiguous head_dim"
    tuning = table(q.device).attention
    num_splits = num_splits or tuning.splits(B, kvh, nbt, sm_count(q.device))
    block_r = max(16, triton.next_power_of_2(Q * group))
    rows = triton.next_power_of_2(Q * group)
    block_q = max(16, triton.next_power_of_2(Q))
    parts = num_splits + 1
    m = torch.empty((B, kvh, parts, rows), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((B, kvh, parts, rows, D), dtype=torch.float32, device=q.device)
    kc = k_cache.view(-1, kvh, D)
    vc = v_cache.view(-1, kvh, D)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert slots is None or Q == 1, f"the cache write in the kernel needs one new token a sequence, got {Q}"
    dummy = ctx_lens
    cos, sin, use_rope, qk_norm, eps, temp = post or (dummy, dummy, False, False, 0.0, None)
    floor_scale, attn_scale = temp or (1.0, 0.0)
    # rows of tokens outside q_index (graph padding) stay unwritten: never read
    out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    alone = B * kvh == 1
    _decode_kernel[(B, kvh, parts)](
        q, k, v, kc, vc, block_table, ctx_lens, q_index, q_positions,
        k_scale if fp8 else dummy, v_scale if fp8 else dummy, cos, sin, dummy if slots is None else slots, m, l, acc,
        Q, nbt, chunk_size or 1, num_splits, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1),
        float(eps), float(floor_scale), float(attn_scale),
        GROUP=group, HEAD_DIM=D, BLOCK_R=block_r, ROWS=rows, BLOCK_KV=bs, BLOCK_Q=block_q,
        LOCAL=chunk_size is not None, FP8=fp8, BF16_DOT=q.dtype == torch.bfloat16, USE_ROPE=use_rope,
        QK_NORM=qk_norm, TEMPERATURE=temp is not None, CACHE=slots is not None, **pdl_launch(q.device),
        num_warps=tuning.alone_warps if alone else tuning.split_warps,
        num_stages=tuning.alone_stages if alone else tuning.split_stages)
    widest = max(8, D * B * kvh // tuning.merge_min_programs)
    block_d = min(D, MERGE_BLOCK_D, 1 << (widest.bit_length() - 1))  # a power of two (batch 3: 24 -> 16)
    _merge_kernel[(B, kvh, D // block_d)](
        m, l, acc, out, q_index, q_positions, ctx_lens, Q, nbt, chunk_size or 1, num_splits, out.stride(0),
        out.stride(1), GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, ROWS=rows, BLOCK_KV=bs,
        MERGE_PARTS=max(1, MERGE_TILE // (rows * block_d)), LOCAL=chunk_size is not None, **pdl_launch(q.device),
        num_warps=4)
    return out
