"""Maverick kernels. Each op is a pure-torch reference (its specification, runs on CPU and GPU)
plus, where one exists, a GPU kernel behind the same name. Imports only torch, triton and itself.

The ops as torch custom ops (`torch.ops.maverick.*`, for torch.compile and opcheck) are registered on
request: `import maverick_plugins.library`. The engine's forward calls the Python entry points below.
"""
from .activation import swiglu
from .allreduce import PeerWorkspace, allreduce_add_rms_norm_ref
from .attention import kv_cache_write, kv_cache_write_ref, paged_attention, paged_attention_ref
from .dispatch import KernelOptions
from .embedding import embedding_rows, embedding_rows_ref
from .fp8 import (FP8_MAX, dequantize_fp8, fp8_linear, fp8_linear_ref, fp8_linear_swiglu,
                  quantize_fp8_dynamic_per_token, quantize_fp8_static)
from .moe import (moe_block, moe_block_ref, moe_experts, moe_experts_grouped, moe_experts_ref, moe_ffn, moe_ffn_ref,
                  moe_router, moe_router_ref)
from .norm import add_rms_norm, add_rms_norm_ref, l2_norm, rms_norm, rms_norm_ref
from .qkv_attention import qkv_attention, qkv_attention_ref
from .rotary import apply_rope, qkv_post, qkv_post_ref, rope_cos_sin, rope_cos_sin_ref

__all__ = [
    "FP8_MAX", "KernelOptions", "PeerWorkspace", "add_rms_norm", "allreduce_add_rms_norm_ref", "add_rms_norm_ref", "apply_rope", "dequantize_fp8", "embedding_rows",
    "embedding_rows_ref", "fp8_linear", "fp8_linear_ref",
    "fp8_linear_swiglu", "qkv_post", "qkv_post_ref",
    "kv_cache_write", "kv_cache_write_ref", "l2_norm", "moe_block", "moe_block_ref", "moe_experts", "moe_experts_grouped", "moe_experts_ref", "moe_ffn", "moe_ffn_ref",
    "moe_router", "moe_router_ref",
    "paged_attention", "paged_attention_ref", "qkv_attention", "qkv_attention_ref", "quantize_fp8_dynamic_per_token", "quantize_fp8_static",
    "rms_norm", "rms_norm_ref", "rope_cos_sin", "rope_cos_sin_ref", "swiglu",
]
