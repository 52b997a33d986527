"""Maverick kernels. Each op is a pure-torch reference (its specification, runs on CPU and GPU)
plus, where one exists, a GPU kernel behind the same name. Imports only torch, triton and itself.
"""
from .activation import swiglu
from .attention import paged_attention, kv_cache_write
from .fp8 import (FP8_MAX, dequantize_fp8, fp8_linear, quantize_fp8_dynamic_per_token,
                  quantize_fp8_static)
from .moe import moe_experts, moe_router
from .norm import l2_norm, rms_norm
from .rotary import apply_rope, rope_cos_sin

__all__ = [
    "FP8_MAX", "apply_rope", "dequantize_fp8", "fp8_linear", "kv_cache_write", "l2_norm",
    "moe_experts", "moe_router", "paged_attention", "quantize_fp8_dynamic_per_token",
    "quantize_fp8_static", "rms_norm", "rope_cos_sin", "swiglu",
]
