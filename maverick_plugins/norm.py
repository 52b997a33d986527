"""RMSNorm and the weightless L2 (QK) norm, exactly as transformers' Llama 4 computes them."""
import torch

from . import dispatch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: the Triton kernel on CUDA, else the reference."""
    if dispatch.active(x):
        from .kernels.rms_norm import rms_norm_triton

        return rms_norm_triton(x.contiguous(), weight, eps)
    return rms_norm_ref(x, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`(x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype) * weight` over the last dim."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype) * weight


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the last dim (Llama 4 QK-norm), computed in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + delta (in x's dtype) and rms_norm(h): the residual add fused with the next norm."""
    if dispatch.active(x):
        from .kernels.small_ops import add_rms_norm_triton

        return add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_ref(x, delta, weight, eps)


def add_rms_norm_ref(x, delta, weight, eps):
    h = x + delta
    return h, rms_norm_ref(h, weight, eps)
