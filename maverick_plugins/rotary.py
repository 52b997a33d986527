"""Interleaved (complex-pair) rotary embedding: pairs (x[2i], x[2i+1]) rotate by pos * inv_freq[i]."""
import torch

from . import dispatch
from .norm import l2_norm


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim/2] in fp32 for integer positions [T]: one Triton kernel on CUDA, else the
    reference."""
    if dispatch.active(positions):
        from .kernels.step_start import rope_cos_sin_triton

        return rope_cos_sin_triton(positions.contiguous(), inv_freq.float().contiguous())
    return rope_cos_sin_ref(positions, inv_freq)


def rope_cos_sin_ref(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[:, None] * inv_freq.float()[None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] in fp32 and return it in x's dtype."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # [T, heads, head_dim/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


def qkv_post(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, heads: int,
             kv_heads: int, head_dim: int, use_rope: bool, qk_norm: bool, eps: float,
             temperature: tuple[float, float] | None, cache: tuple | None = None):
    """Split fused QKV [T, (heads + 2 kv_heads) * D] into q, k, v; RoPE and QK-norm q and k (RoPE
    layers); scale q by the NoPE temperature log(floor((pos+1)/floor_scale)+1)*attn_scale+1 (given as
    (floor_scale, attn_scale)). cache = (k_cache, v_cache, slots, k_scale, v_scale): also write k and v
    to their cache slots, as kv_cache_write does. One fused kernel on CUDA."""
    if dispatch.active(qkv):
        from .kernels.small_ops import qkv_post_triton

        return qkv_post_triton(qkv.contiguous(), cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm,
                               eps, temperature, cache)
    q, k, v = qkv_post_ref(qkv, cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm, eps, temperature)
    if cache is not None:
        from .attention import kv_cache_write

        kv_cache_write(k, v, *cache)
    return q, k, v


def qkv_post_ref(qkv, cos, sin, positions, heads, kv_heads, head_dim, use_rope, qk_norm, eps, temperature):
    T = qkv.shape[0]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim), v.view(T, kv_heads, head_dim)
    if use_rope:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if qk_norm:
        q, k = l2_norm(q, eps), l2_norm(k, eps)
    if temperature is not None:
        floor_scale, attn_scale = temperature
        scale = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
        q = (q * scale[:, None, None]).to(q.dtype)
    return q, k, v
