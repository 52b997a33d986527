"""The ops as torch custom ops (`torch.ops.maverick.*`), each with a fake (meta) implementation.

The registration makes every op opaque to torch.compile and FakeTensor tracing (so a compiled graph
calls the Triton kernel, never traces into it) and gives each a checked schema: `torch.library.opcheck`
runs in the tests. The layers call the plain Python entry points (`maverick_plugins.fp8_linear`, ...)
instead: decode steps replay CUDA graphs, where the two are the same kernels, and the dispatcher would
add host time to every eager prefill launch.
"""
from __future__ import annotations

import torch

from .attention import kv_cache_write as _kv_cache_write
from .attention import paged_attention as _paged_attention
from .embedding import embedding_rows as _embedding_rows
from .fp8 import fp8_linear as _fp8_linear
from .fp8 import fp8_linear_swiglu as _fp8_linear_swiglu
from .moe import moe_block as _moe_block
from .moe import moe_experts as _moe_experts
from .moe import moe_ffn as _moe_ffn
from .moe import moe_router as _moe_router
from .norm import add_rms_norm as _add_rms_norm
from .norm import rms_norm as _rms_norm
from .qkv_attention import qkv_attention as _qkv_attention
from .rotary import rope_cos_sin as _rope_cos_sin


@torch.library.custom_op("maverick::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return _fp8_linear(x, weight, weight_scale, input_scale, out_dtype)


@fp8_linear.register_fake
def _(x, weight, weight_scale, input_scale, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("maverick::fp8_linear_swiglu", mutates_args=())
def fp8_linear_swiglu(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      input_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return _fp8_linear_swiglu(x, weight, weight_scale, input_scale, out_dtype)


@fp8_linear_swiglu.register_fake
def _(x, weight, weight_scale, input_scale, out_dtype):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2), dtype=out_dtype)


@torch.library.custom_op("maverick::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rms_norm(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("maverick::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _add_rms_norm(x, delta, weight, eps)


@add_rms_norm.register_fake
def _(x, delta, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@torch.library.custom_op("maverick::embedding_rows", mutates_args=())
def embedding_rows(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    return _embedding_rows(ids, weight, start)


@embedding_rows.register_fake
def _(ids, weight, start):
    return weight.new_empty((ids.numel(), weight.shape[1]))


@torch.library.custom_op("maverick::rope_cos_sin", mutates_args=())
def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _rope_cos_sin(positions, inv_freq)


@rope_cos_sin.register_fake
def _(positions, inv_freq):
    shape = (positions.numel(), inv_freq.numel())
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("maverick::moe_router", mutates_args=())
def moe_router(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids, scores = _moe_router(x, router_weight, top_k)
    return ids.contiguous(), scores.contiguous()


@moe_router.register_fake
def _(x, router_weight, top_k):
    return (x.new_empty((x.shape[0], top_k), dtype=torch.int64), x.new_empty((x.shape[0], top_k)))


@torch.library.custom_op("maverick::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, expert_offset: int, gate_up_scale: torch.Tensor | None,
                gate_up_input_scale: torch.Tensor | None, down_scale: torch.Tensor | None,
                down_input_scale: torch.Tensor | None) -> torch.Tensor:
    return _moe_experts(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale, gate_up_input_scale,
                        down_scale, down_input_scale)


@moe_experts.register_fake
def _(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale, gate_up_input_scale, down_scale,
      down_input_scale):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("maverick::moe_ffn", mutates_args=())
def moe_ffn(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor, expert_offset: int, gate_up_scale: torch.Tensor,
            gate_up_input_scale: torch.Tensor | None, down_scale: torch.Tensor,
            down_input_scale: torch.Tensor | None, shared_gate_up: torch.Tensor, shared_gate_up_scale: torch.Tensor,
            shared_gate_up_input_scale: torch.Tensor, shared_down: torch.Tensor, shared_down_scale: torch.Tensor,
            shared_down_input_scale: torch.Tensor) -> torch.Tensor:
    return _moe_ffn(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale, gate_up_input_scale,
                    down_scale, down_input_scale, shared_gate_up, shared_gate_up_scale, shared_gate_up_input_scale,
                    shared_down, shared_down_scale, shared_down_input_scale)


@moe_ffn.register_fake
def _(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("maverick::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table: torch.Tensor, ctx_lens: torch.Tensor, q_index: torch.Tensor,
                    q_positions: torch.Tensor, token_to_padded: torch.Tensor, scale: float, chunk_size: int | None,
                    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> torch.Tensor:
    return _paged_attention(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, token_to_padded,
                            scale, chunk_size, k_scale, v_scale)


@paged_attention.register_fake
def _(q, k, v, k_cache, v_cache, block_table, ctx_lens, q_index, q_positions, token_to_padded, scale, chunk_size,
      k_scale, v_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("maverick::kv_cache_write", mutates_args=("k_cache", "v_cache"))
def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    _kv_cache_write(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@kv_cache_write.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    return None


@torch.library.custom_op("maverick::qkv_attention", mutates_args=("k_cache", "v_cache"))
def qkv_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, heads: int,
                  kv_heads: int, head_dim: int, use_rope: bool, qk_norm: bool, eps: float,
                  temperature: list[float] | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                  block_table: torch.Tensor, ctx_lens: torch.Tensor, q_index: torch.Tensor,
                  q_positions: torch.Tensor, token_to_padded: torch.Tensor, scale: float,
                  chunk_size: int | None) -> torch.Tensor:
    return _qkv_attention(qkv, cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm, eps,
                          None if temperature is None else (temperature[0], temperature[1]), k_cache, v_cache,
                          slots, k_scale, v_scale, block_table, ctx_lens, q_index, q_positions, token_to_padded,
                          scale, chunk_size)


@qkv_attention.register_fake
def _(qkv, cos, sin, positions, heads, kv_heads, head_dim, *args):
    return qkv.new_empty((qkv.shape[0], heads, head_dim))


@torch.library.custom_op("maverick::moe_block", mutates_args=())
def moe_block(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, gate_up: torch.Tensor, down: torch.Tensor,
              expert_offset: int, gate_up_scale: torch.Tensor, gate_up_input_scale: torch.Tensor | None,
              down_scale: torch.Tensor, down_input_scale: torch.Tensor | None, shared_gate_up: torch.Tensor,
              shared_gate_up_scale: torch.Tensor, shared_gate_up_input_scale: torch.Tensor, shared_down: torch.Tensor,
              shared_down_scale: torch.Tensor, shared_down_input_scale: torch.Tensor) -> torch.Tensor:
    return _moe_block(x, router_weight, top_k, gate_up, down, expert_offset, gate_up_scale, gate_up_input_scale,
                      down_scale, down_input_scale, shared_gate_up, shared_gate_up_scale, shared_gate_up_input_scale,
                      shared_down, shared_down_scale, shared_down_input_scale)


@moe_block.register_fake
def _(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
