"""Paged attention over a KV cache, prefill and decode alike (reference).

Cache layout, per layer: k_cache, v_cache [num_blocks + 1, block_size, kv_heads, head_dim]; the last
block is scratch where padded or skipped tokens write. A sequence's block table lists its blocks.

Global (NoPE) layers: slot j of a sequence holds the key at position j.
Local (RoPE, chunked) layers keep a ring of one chunk C: slot j holds the newest position p with
p % C == j. A query at position p sees keys in [p // C * C, p]; those all sit in slots
0 .. p % C, so the ring never needs more than C slots. This step's own keys are attended directly
(not re-read from the ring), so a step that crosses a chunk boundary stays exact.
"""
import torch

from . import dispatch


def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """Write k, v [T, kv_heads, head_dim] to flat slots [T] (quantised when the cache is FP8)."""
    if dispatch.active(k) and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]:
        from .kernels.small_ops import kv_write_triton

        return kv_write_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    kv_cache_write_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def kv_cache_write_ref(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    kc = k_cache.view(-1, *k_cache.shape[2:])
    vc = v_cache.view(-1, *v_cache.shape[2:])
    if k_cache.dtype == torch.float8_e4m3fn:  # byte views: index_copy_ has no fp8 kernel on CPU
        kc.view(torch.uint8).index_copy_(0, slot_mapping, _quantize(k, k_scale).view(torch.uint8))
        vc.view(torch.uint8).index_copy_(0, slot_mapping, _quantize(v, v_scale).view(torch.uint8))
        return
    kc.index_copy_(0, slot_mapping, k.to(kc.dtype))
    vc.index_copy_(0, slot_mapping, v.to(vc.dtype))


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale.float()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def _read(cache: torch.Tensor, block_table: torch.Tensor, scale: torch.Tensor | None,
          dtype: torch.dtype) -> torch.Tensor:
    x = cache[block_table].flatten(1, 2)  # [B, blocks * block_size, kv_heads, head_dim]
    if cache.dtype == torch.float8_e4m3fn:
        return (x.float() * scale.float()).to(dtype)
    return x.to(dtype)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    ctx_lens: torch.Tensor, q_index: torch.Tensor, q_positions: torch.Tensor,
                    token_to_padded: torch.Tensor, scale: float, chunk_size: int | None,
                    k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """On CUDA: the split-KV kernel for a few new tokens per sequence, the FlashAttention-style kernel
    for more (prefill); else the reference."""
    kernel = dispatch.attention(q, k_cache, q_index.shape[1])
    if kernel:
        if kernel == "decode":
            from .kernels.decode_attention import decode_attention

            return decode_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, scale,
                                    chunk_size, k_scale, v_scale)
        from .kernels.prefill_attention import prefill_attention

        return prefill_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, scale,
                                 chunk_size, k_scale, v_scale)
    return paged_attention_ref(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions,
                               token_to_padded, scale, chunk_size, k_scale, v_scale)


def paged_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    ctx_lens: torch.Tensor, q_index: torch.Tensor, q_positions: torch.Tensor,
                    token_to_padded: torch.Tensor, scale: float, chunk_size: int | None,
                    k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of this step's tokens over the cached context plus themselves.

    q [T, heads, D]; k, v [T, kv_heads, D]: this step's tokens, flattened over sequences.
    block_table [B, nb]; ctx_lens [B]: tokens already cached before this step.
    q_index [B, Q]: token index of each sequence's j-th new token (padding: any index);
    q_positions [B, Q]: their absolute positions (-1 for padding);
    token_to_padded [T]: b * Q + j for each token. chunk_size: None (global) or C (local ring).
    The cache is read, not written: call kv_cache_write after. Returns [T, heads, D] in q's dtype.
    """
    B, Q = q_index.shape
    T, H, D = q.shape
    kvh = k.shape[1]
    dt = torch.float32
    if k_cache.dtype == torch.float8_e4m3fn:  # attend to this step's keys exactly as the cache will hold them
        k = _quantize(k, k_scale).float() * k_scale.float()
        v = _quantize(v, v_scale).float() * v_scale.float()
    kc = _read(k_cache, block_table, k_scale, dt)  # [B, L, kvh, D]
    vc = _read(v_cache, block_table, v_scale, dt)
    L = kc.shape[1]
    slot = torch.arange(L, device=q.device)[None, :]  # [1, L]
    ctx = ctx_lens[:, None].long()
    cache_valid = slot < ctx
    if chunk_size is None:
        cache_pos = slot.expand(B, L)
    else:  # newest position congruent to the slot modulo C below ctx
        cache_pos = slot + chunk_size * torch.div(ctx - 1 - slot, chunk_size, rounding_mode="floor")
    key_pos = torch.cat([torch.where(cache_valid, cache_pos, -1), q_positions], dim=1)  # [B, L+Q]
    keys = torch.cat([kc, k[q_index].to(dt)], dim=1)  # [B, L+Q, kvh, D]
    values = torch.cat([vc, v[q_index].to(dt)], dim=1)

    qpos = q_positions[:, :, None]  # [B, Q, 1]
    kpos = key_pos[:, None, :]  # [B, 1, L+Q]
    visible = (kpos >= 0) & (kpos <= qpos) & (qpos >= 0)
    if chunk_size is not None:
        visible &= torch.div(kpos, chunk_size, rounding_mode="floor") == \
            torch.div(qpos, chunk_size, rounding_mode="floor")

    qp = q[q_index].to(dt).view(B, Q, kvh, H // kvh, D)  # GQA: q head h reads kv head h // group
    scores = torch.einsum("bqhgd,bkhd->bhgqk", qp, keys) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded rows see nothing
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, values).reshape(B * Q, H, D)
    return out[token_to_padded].to(q.dtype)
