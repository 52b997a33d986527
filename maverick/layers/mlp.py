"""Dense SwiGLU FFN (dense layers and the shared expert): down(silu(gate(x)) * up(x))."""
import torch
from torch import nn

from .linear import MergedColumnParallelLinear, RowParallelLinear


class Llama4MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, tp_size: int, dtype: torch.dtype, fp8: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, intermediate, tp_size, dtype, fp8)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp_size, dtype, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Partial sum over this rank's intermediate slice; the caller all-reduces."""
        return self.down_proj(self.gate_up_proj.forward_swiglu(x))
