"""SwiGLU over a fused gate|up activation."""
import torch
import torch.nn.functional as F


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` where gate is the first half of the last dim and up the second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
