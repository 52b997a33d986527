"""Tile loads and the visibility rule shared by the decode and prefill attention kernels.

A key is visible to a query when both are real (position >= 0), the key is not in the query's future,
and, on chunked local layers, both sit in the same chunk. Cached keys are read before this step's
write (a local layer's ring slot holds the newest position with that residue below ctx); this step's
own keys come from the k / v tensors, rounded through FP8 when the cache is FP8, exactly as the cache
will hold them.
"""
import triton
import triton.language as tl

from .e4m3 import to_e4m3


@triton.jit
def visible(kpos, qpos, CHUNK, LOCAL: tl.constexpr):
    """[rows, keys] mask for key positions kpos [keys] and query positions qpos [rows] (-1: padding)."""
    vis = (kpos[None, :] >= 0) & (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] >= 0)
    if LOCAL:
        vis = vis & ((kpos[None, :] // CHUNK) == (qpos[:, None] // CHUNK))
    return vis


@triton.jit
def cache_tile(kc_ptr, vc_ptr, table_ptr, b, NBT, t0, h, ctx, stride_cs, stride_ch, offs_d, k_scale, v_scale,
               CHUNK, BLOCK_KV: tl.constexpr, LOCAL: tl.constexpr, FP8: tl.constexpr):
    """K and V (fp32, dequantized) of the cache block holding slots t0 .. t0 + BLOCK_KV of sequence b,
    kv head h; the key position of each slot; and which slots hold context (slot < ctx)."""
    slots = t0 + tl.arange(0, BLOCK_KV)
    blk = tl.load(table_ptr + b * NBT + t0 // BLOCK_KV).to(tl.int64)
    kv_off = (blk * BLOCK_KV + tl.arange(0, BLOCK_KV))[:, None] * stride_cs + h * stride_ch + offs_d[None, :]
    k = tl.load(kc_ptr + kv_off).to(tl.float32)
    v = tl.load(vc_ptr + kv_off).to(tl.float32)
    if FP8:
        k = k * k_scale
        v = v * v_scale
    if LOCAL:  # ring slot -> newest position with that residue below ctx
        kpos = slots + CHUNK * ((ctx - 1 - slots) // CHUNK)
    else:
        kpos = slots
    return k, v, kpos, slots < ctx


@triton.jit
def new_rows(qidx_ptr, qpos_ptr, b, Q, jj):
    """This step's tokens jj of sequence b: (token index, position, real); rows past Q: token 0, position -1."""
    jj_ok = jj < Q
    tok = tl.load(qidx_ptr + b * Q + jj, mask=jj_ok, other=0).to(tl.int64)
    pos = tl.load(qpos_ptr + b * Q + jj, mask=jj_ok, other=-1)
    return tok, pos, jj_ok


@triton.jit
def as_cached(x, scale, FP8: tl.constexpr):
    """x (f32) as the cache will hold it: rounded through FP8 when the cache is FP8."""
    if FP8:
        x = to_e4m3(x, scale).to(tl.float32) * scale
    return x


@triton.jit
def new_tile(k_ptr, v_ptr, qidx_ptr, qpos_ptr, b, Q, jj, h, stride_kt, stride_kh, stride_vt, stride_vh, offs_d,
             k_scale, v_scale, FP8: tl.constexpr):
    """K and V (fp32) of this step's tokens jj of sequence b (rows past Q: zeros at position -1)."""
    ktok, kpos, jj_ok = new_rows(qidx_ptr, qpos_ptr, b, Q, jj)
    k = tl.load(k_ptr + ktok[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=jj_ok[:, None],
                other=0.0).to(tl.float32)
    v = tl.load(v_ptr + ktok[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=jj_ok[:, None],
                other=0.0).to(tl.float32)
    # attend to the keys exactly as the cache will hold them
    return as_cached(k, k_scale, FP8), as_cached(v, v_scale, FP8), kpos


@triton.jit
def online_softmax_tile(q, k, v, vis, m_i, l_i, acc, sm_scale, BF16_DOT: tl.constexpr):
    """Fold one K/V tile into the running max m_i, sum l_i and output acc of rows q (masked by vis)."""
    if BF16_DOT:  # bf16 model: q and k hold bf16 values, the products are exact in the tensor core
        sc = tl.dot(q.to(tl.bfloat16), tl.trans(k.to(tl.bfloat16))) * sm_scale
    else:
        sc = tl.dot(q, tl.trans(k), input_precision="ieee") * sm_scale
    sc = tl.where(vis, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    p = tl.exp(sc - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if BF16_DOT:
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    return m_new, l_i, acc
