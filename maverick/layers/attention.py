"""Llama 4 attention: fused QKV, RoPE + optional QK-norm on RoPE (chunked, local) layers,
temperature-tuned queries on NoPE (global) layers, paged KV cache, GQA.
"""
from __future__ import annotations

import torch
from torch import nn

import maverick_plugins as ops
from maverick.config import ModelConfig

from .forward_batch import ForwardBatch
from .linear import QKVParallelLinear, RowParallelLinear


class Llama4Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp_size: int, dtype: torch.dtype,
                 fp8: bool = False, fp8_kv_cache: bool = False):
        super().__init__()
        self.cfg = cfg
        self.use_rope = cfg.uses_rope(layer_id)
        self.use_qk_norm = cfg.use_qk_norm and self.use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.chunk_size = cfg.attention_chunk_size if self.use_rope else None
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.head_dim, tp_size, dtype, fp8)
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, tp_size, dtype, fp8)
        self.heads, self.kv_heads = self.qkv_proj.local_heads, self.qkv_proj.local_kv_heads
        if fp8_kv_cache:  # amax / 448 of k and v, from calibration
            self.k_scale = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
            self.v_scale = nn.Parameter(torch.ones((), dtype=torch.float32), requires_grad=False)
        else:
            self.k_scale = self.v_scale = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Returns this rank's partial o_proj output; the decoder layer all-reduces it."""
        return self.o_proj(self.attend(self.qkv_proj(x), batch, rope, kv_cache))

    def attend(self, qkv: torch.Tensor, batch: ForwardBatch, rope: tuple[torch.Tensor, torch.Tensor],
               kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The attention output [T, heads * head_dim] of this step's qkv projection (o_proj's input)."""
        T = qkv.shape[0]
        temperature = (self.cfg.floor_scale, self.cfg.attn_scale) if self.temperature_tuning else None
        k_cache, v_cache = kv_cache
        if self.use_rope:
            table, slots = batch.local_block_table, batch.local_slots
        else:
            table, slots = batch.global_block_table, batch.global_slots
        # RoPE + QK-norm (RoPE layers) or the temperature scale of q (NoPE layers), attention over the paged
        # cache, this step's k and v into it: at decode one kernel (maverick_plugins/qkv_attention.py)
        o = ops.qkv_attention(qkv, rope[0], rope[1], batch.positions, self.heads, self.kv_heads,
                              self.head_dim, self.use_rope, self.use_qk_norm, self.cfg.rms_norm_eps, temperature,
                              k_cache, v_cache, slots, self.k_scale, self.v_scale, table, batch.ctx_lens,
                              batch.q_index, batch.q_positions, batch.token_to_padded, self.scale, self.chunk_size)
        return o.reshape(T, self.heads * self.head_dim)
