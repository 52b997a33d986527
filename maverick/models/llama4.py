"""The Llama 4 text network (the "network definition"), tensor parallel.

Pre-norm decoder layers: h = x + o_proj(attn(input_layernorm(x))); out = h + ffn(post_attention_layernorm(h)),
with FFN dense on some layers and MoE on others (Maverick alternates). Two all-reduces per layer, both
visible below (each fused with the residual add and the next RMSNorm). Weight names equal the engine's tensor names (see maverick/checkpoint/names.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from maverick.config import ModelConfig
from maverick.layers import (ForwardBatch, Llama4Attention, Llama4MLP, Llama4MoE, ParallelLMHead,
                             RMSNorm, RotaryEmbedding, VocabParallelEmbedding, all_reduce_add_rms_norm, layer_tails)


@dataclass(frozen=True)
class ModelSpec:
    """How one rank's copy of the network is laid out (everything the builder decided)."""

    tp_size: int = 1
    tp_rank: int = 0
    ep_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    fp8: bool = False  # linears: FP8 per-tensor weights and static activation scales (ModelOpt)
    fp8_kv_cache: bool = False
    experts_fp8: str | None = None  # routed experts: None, "tensor" (ModelOpt) or "channel" (Meta FP8)
    lm_head_fp8: bool = False  # lm_head rows e4m3 with a scale each, activations per token on the fly


class Llama4DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, spec: ModelSpec):
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.uses_rope = cfg.uses_rope(layer_id)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype)
        self.self_attn = Llama4Attention(cfg, layer_id, spec.tp_size, spec.dtype, spec.fp8, spec.fp8_kv_cache)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype)
        if self.is_moe:
            self.feed_forward = Llama4MoE(cfg, spec.tp_size, spec.tp_rank, spec.ep_size, spec.dtype,
                                          spec.fp8, spec.experts_fp8)
        else:
            self.feed_forward = Llama4MLP(cfg.hidden_size, cfg.intermediate_size_mlp, spec.tp_size,
                                          spec.dtype, spec.fp8)

    def forward(self, x: torch.Tensor, normed: torch.Tensor, batch: ForwardBatch, rope, kv_cache,
                next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; normed: input_layernorm(x), computed by the previous layer's fused add.
        Returns the new residual and next_norm of it (the next layer's input norm, or the final norm)."""
        site = 2 * self.layer_id  # each all-reduce of the step has its own peer buffer
        h, n2 = all_reduce_add_rms_norm(x, self.self_attn(normed, batch, rope, kv_cache),
                                        self.post_attention_layernorm.weight, self.post_attention_layernorm.eps, site)
        return all_reduce_add_rms_norm(h, self.feed_forward(n2), next_norm.weight, next_norm.eps, site + 1)


class Llama4ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: ModelSpec = ModelSpec()):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        cfg.validate_parallel(spec.tp_size, spec.ep_size)
        padded = cfg.padded_vocab_size(spec.tp_size)
        self.embed_tokens = VocabParallelEmbedding(padded, cfg.hidden_size, spec.tp_size, spec.tp_rank, spec.dtype)
        self.layers = nn.ModuleList(Llama4DecoderLayer(cfg, i, spec) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, padded, cfg.hidden_size, spec.tp_size, spec.dtype,
                                      spec.lm_head_fp8)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.feature_sink = None  # an EAGLE-3 draft's (maverick/runtime/speculative.py): fed every forward
        self.tails = None  # use_persistent(): each layer's tail after attention as one launch, for one-token steps

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Per-layer K (and V) pool shape; one extra scratch block at the end."""
        return (num_blocks + 1, block_size, self.layers[0].self_attn.kv_heads, self.cfg.head_dim)

    def use_persistent(self, dot: bool = False) -> None:
        """One-token steps as two launches a layer: attention, then one persistent launch for o_proj, the
        FFN and the next layer's qkv (maverick/layers/persistent_tail.py). The chains share the layers'
        weights (no second copy) and one workspace. One rank only: the tail has no all-reduce yet. dot: the
        chains' products on tensor cores."""
        self.tails = layer_tails(self.layers, self.cfg.rms_norm_eps, dot)

    def forward(self, batch: ForwardBatch, kv_caches: list, aux_layers: tuple[int, ...] = ()):
        """fp32 logits [N, vocab] for the tokens in batch.logits_indices (KV of every token cached). With
        aux_layers (an EAGLE-3 draft's features): also the residual stream after each of those layers, for
        every token, concatenated [T, len(aux_layers) * hidden]. With a feature_sink, those of its layers go
        to it (inside the same CUDA graph)."""
        sink = self.feature_sink
        wanted = set(aux_layers) | set(sink.layers if sink is not None else ())
        x = self.embed_tokens(batch.input_ids)
        rope = self.rotary_emb(batch.positions)
        normed = self.layers[0].input_layernorm(x)
        aux = {}
        if self.tails is not None and x.shape[0] == 1:  # a shape, fixed per graph: no data-dependent branch
            x, normed = self._layers_persistent(x, normed, batch, rope, kv_caches, wanted, aux)
        else:
            norms = [layer.input_layernorm for layer in self.layers[1:]] + [self.norm]
            for layer, kv, next_norm in zip(self.layers, kv_caches, norms):
                x, normed = layer(x, normed, batch, rope, kv, next_norm)
                if layer.layer_id in wanted:
                    aux[layer.layer_id] = x
        if sink is not None:
            sink.write(torch.cat([aux[i] for i in sink.layers], dim=-1), batch.global_slots)
        logits = self.lm_head(normed[batch.logits_indices])
        if not aux_layers:
            return logits
        return logits, torch.cat([aux[i] for i in aux_layers], dim=-1)

    def _layers_persistent(self, x, normed, batch, rope, kv_caches, wanted, aux):
        """The layers of a one-token step as attention + tail chain each (use_persistent)."""
        qkv = self.layers[0].self_attn.qkv_proj(normed)
        last = len(self.layers) - 1
        for layer, kv, tail in zip(self.layers, kv_caches, self.tails):
            o = layer.self_attn.attend(qkv, batch, rope, kv)
            out = tail(o, x)
            # the tail's residual stream after the FFN: its last stage, or the one before the next qkv
            x = (out if layer.layer_id == last else tail.output(-2)).reshape(1, -1)
            qkv = out.reshape(1, -1)
            if layer.layer_id in wanted:
                aux[layer.layer_id] = x  # a view of the tails' workspace, concatenated (copied) below
        return x, self.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding (an EAGLE-3 draft reads the target's)."""
        return self.embed_tokens(input_ids)
