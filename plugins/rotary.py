"""Interleaved (complex-pair) rotary embedding: pairs (x[2i], x[2i+1]) rotate by pos * inv_freq[i]."""
import torch


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim/2] in fp32 for integer positions [T]."""
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] in fp32 and return it in x's dtype."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # [T, heads, head_dim/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)
