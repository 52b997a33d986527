"""Linear layers. The builder writes each rank's weights already sharded (and fused), so a layer
takes global sizes, computes its local sizes with an asserting divide(), and never slices.

Weights are [out, in] in the compute dtype, or FP8 e4m3 with a static per-tensor `input_scale`
(ModelOpt's format) and a `weight_scale` that is a scalar, or, for fused weights (q|k|v, gate|up),
one value per output row: each fused segment keeps its own checkpoint scale, so fusing adds no
rounding error (a requantization to one shared scale would).
"""
from __future__ import annotations

import torch
from torch import nn

import maverick_plugins as ops
from maverick.config import divide


def _param(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight^T at local sizes; FP8 when `fp8` (weights e4m3, per-tensor scales)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, fp8: bool = False,
                 row_scales: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.fp8 = in_features, out_features, fp8
        self.out_dtype = dtype
        if fp8:
            self.weight = _param((out_features, in_features), torch.float8_e4m3fn)
            self.weight_scale = _param((out_features,) if row_scales else (), torch.float32)
            self.input_scale = _param((), torch.float32)
        else:
            self.weight = _param((out_features, in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return ops.fp8_linear(x, self.weight, self.weight_scale, self.input_scale, self.out_dtype)
        return torch.nn.functional.linear(x, self.weight)


class QKVParallelLinear(Linear):
    """Fused q|k|v projection; each rank holds heads/tp query heads and kv_heads/tp kv heads."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, tp_size: int,
                 dtype: torch.dtype, fp8: bool = False):
        self.local_heads = divide(heads, tp_size, "num_attention_heads (per tp_size)")
        self.local_kv_heads = divide(kv_heads, tp_size, "num_key_value_heads (per tp_size)")
        self.q_size = self.local_heads * head_dim
        self.kv_size = self.local_kv_heads * head_dim
        super().__init__(hidden, self.q_size + 2 * self.kv_size, dtype, fp8, row_scales=True)


class MergedColumnParallelLinear(Linear):
    """Fused gate|up projection: [2 * intermediate/tp, hidden], gate rows first."""

    def __init__(self, hidden: int, intermediate: int, tp_size: int, dtype: torch.dtype, fp8: bool = False):
        self.local_intermediate = divide(intermediate, tp_size, "intermediate size (per tp_size)")
        super().__init__(hidden, 2 * self.local_intermediate, dtype, fp8, row_scales=True)

    def forward_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up; FP8 fuses it into the GEMM epilogue (FC13 + SwiGLU)."""
        if self.fp8:
            return ops.fp8_linear_swiglu(x, self.weight, self.weight_scale, self.input_scale, self.out_dtype)
        return ops.swiglu(torch.nn.functional.linear(x, self.weight))


class RowParallelLinear(Linear):
    """Input dim sharded: each rank produces a partial sum; the caller all-reduces it."""

    def __init__(self, in_features: int, out_features: int, tp_size: int, dtype: torch.dtype, fp8: bool = False):
        super().__init__(divide(in_features, tp_size, "row-parallel in_features (per tp_size)"),
                         out_features, dtype, fp8)
