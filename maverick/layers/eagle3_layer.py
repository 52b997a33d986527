"""The EAGLE-3 draft's decoder layer: Llama 3 attention over concat(input_layernorm(embedding),
hidden_norm(h)) [T, 2H], a SwiGLU MLP, the residual stream starting from h.

Its linears are the target's Linear layers: FP8 (ModelOpt's per-tensor scales, the target's FP8 GEMV/GEMM
kernels) for the names in cfg.fp8_linears, the compute dtype otherwise.

It keeps its own paged KV cache, addressed through the batch's global block tables (every position kept,
as in the target's NoPE layers), and rotates q and k as Llama 3 does (pairs i, i + D/2), not as Llama 4's
interleaved pairs. Replicated on every rank: one layer, no collectives.
"""
from __future__ import annotations

import torch
from torch import nn

import maverick_plugins as ops
from maverick.config import Eagle3Config

from .forward_batch import ForwardBatch
from .linear import Linear, MergedColumnParallelLinear, QKVParallelLinear
from .norm import RMSNorm
from .rotary import rope_inv_freq


def rotate_half_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama 3's RoPE: x [T, heads, D] rotated in the pairs (i, i + D/2); cos, sin [T, D/2] fp32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class Eagle3DecoderLayer(nn.Module):
    """Checkpoint names under `midlayer.`, with q|k|v fused (qkv_proj) and gate|up fused (gate_up_proj)."""

    def __init__(self, cfg: Eagle3Config, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        H, I = cfg.hidden_size, cfg.intermediate_size
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps, dtype)
        fp8 = cfg.fp8_linears
        self.qkv_proj = QKVParallelLinear(2 * H, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 1,
                                          dtype, "qkv_proj" in fp8)
        self.o_proj = Linear(cfg.num_attention_heads * cfg.head_dim, H, dtype, "o_proj" in fp8)
        self.gate_up_proj = MergedColumnParallelLinear(H, I, 1, dtype, "gate_up_proj" in fp8)
        self.down_proj = Linear(I, H, dtype, "down_proj" in fp8)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, embeds: torch.Tensor, h: torch.Tensor, batch: ForwardBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """embeds, h [T, H] -> the layer's output [T, H]; this step's k and v go to kv_cache."""
        cfg = self.cfg
        T = h.shape[0]
        nq, nkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(h)], dim=-1)
        q, k, v = self.qkv_proj(x).split([nq * D, nkv * D, nkv * D], dim=-1)
        angles = batch.positions.float()[:, None] * self.inv_freq.to(h.device)[None, :]
        cos, sin = angles.cos(), angles.sin()
        q = rotate_half_rope(q.reshape(T, nq, D), cos, sin)
        k = rotate_half_rope(k.reshape(T, nkv, D), cos, sin)
        v = v.reshape(T, nkv, D)
        k_cache, v_cache = kv_cache
        o = ops.paged_attention(q, k, v, k_cache, v_cache, batch.global_block_table, batch.ctx_lens,
                                batch.q_index, batch.q_positions, batch.token_to_padded, self.scale, None)
        ops.kv_cache_write(k, v, k_cache, v_cache, batch.global_slots)
        h = h + self.o_proj(o.reshape(T, nq * D))
        return h + self.down_proj(self.gate_up_proj.forward_swiglu(self.post_attention_layernorm(h)))
