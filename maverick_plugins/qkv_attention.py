"""A decode step's attention between its two projections: qkv_post, paged attention, the KV-cache write.

At one new token a sequence the split-KV kernel does all three (on CUDA): its programs apply RoPE,
QK-norm and the temperature to the q and k rows they load from the raw QKV output, and the program that
takes a sequence's new key also writes k and v to the cache. That is one launch a layer fewer than
qkv_post + decode attention (48 a Maverick step; benchmarks/HISTORY.md has the measurement). Otherwise the three
ops run one after another, as the reference does.
"""
import torch

from . import dispatch
from .attention import kv_cache_write, kv_cache_write_ref, paged_attention, paged_attention_ref
from .rotary import qkv_post, qkv_post_ref


def qkv_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, heads: int,
                  kv_heads: int, head_dim: int, use_rope: bool, qk_norm: bool, eps: float,
                  temperature: tuple[float, float] | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                  block_table: torch.Tensor, ctx_lens: torch.Tensor, q_index: torch.Tensor,
                  q_positions: torch.Tensor, token_to_padded: torch.Tensor, scale: float,
                  chunk_size: int | None) -> torch.Tensor:
    """qkv [T, (heads + 2 kv_heads) * head_dim] -> attention output [T, heads, head_dim]; this step's k, v
    written to `slots` of the caches. Arguments as qkv_post's and paged_attention's."""
    T = qkv.shape[0]
    q, k, v = (t.view(T, -1, head_dim) for t in qkv.split([heads * head_dim, kv_heads * head_dim,
                                                          kv_heads * head_dim], dim=-1))
    one_new = q_index.shape[1] == 1  # a shape: the same branch in every replay of a graph
    if one_new and qkv.stride(-1) == 1 and dispatch.attention(q, k_cache, q_index.shape[1]) == "decode":
        from .kernels.decode_attention import decode_attention

        return decode_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, scale,
                                chunk_size, k_scale, v_scale, post=(cos, sin, use_rope, qk_norm, eps, temperature),
                                slots=slots)
    # One new token a sequence: its slot (p, or p % C in the local ring, which held p - C) is none that
    # attention reads, so qkv_post may write it first (one launch fewer). With several, a later token's
    # ring slot can hold a key an earlier one still reads: the write waits until after attention.
    write = (k_cache, v_cache, slots, k_scale, v_scale)
    q, k, v = qkv_post(qkv, cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm, eps, temperature,
                       write if one_new else None)
    out = paged_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, token_to_padded,
                          scale, chunk_size, k_scale, v_scale)
    if not one_new:
        kv_cache_write(k, v, *write)
    return out


def qkv_attention_ref(qkv, cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm, eps, temperature,
                      k_cache, v_cache, slots, k_scale, v_scale, block_table, ctx_lens, q_index, q_positions,
                      token_to_padded, scale, chunk_size) -> torch.Tensor:
    """The specification: qkv_post, attention over the cache as it was, then the cache write."""
    q, k, v = qkv_post_ref(qkv, cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm, eps, temperature)
    out = paged_attention_ref(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions,
                              token_to_padded, scale, chunk_size, k_scale, v_scale)
    kv_cache_write_ref(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    return out
