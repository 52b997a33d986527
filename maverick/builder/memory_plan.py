"""Per-rank memory plan for a model + build config, computed without weights (meta tensors).

Weights: exact bytes of the rank's engine tensors. KV cache: global (NoPE) layers hold max_seq_len
tokens per sequence, local (chunked RoPE) layers at most one chunk, at max_batch_size sequences.
Activations: the peak working set of one step of max_num_tokens tokens (residual, QKV, attention
output, the widest FFN, fp32 logits of max_batch_size rows with the sampler's sort). CUDA graphs:
the same estimate at each captured batch size, plus the largest prefill graph (the graphs share one
memory pool, captured largest first). Reserve: CUDA context, NCCL buffers and allocator
slack, 2 GiB. An EAGLE-3 draft: its rank's weights (lm_head split by vocabulary), its KV cache (one layer in
the global block tables) and the cache of the target's fused features (one hidden vector per global slot).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick.config import BuildConfig, Eagle3Config, ModelConfig, torch_dtype
from maverick.models import Llama4ForCausalLM
from maverick.models.eagle3 import Eagle3Draft

from .spec import model_spec

GIB = 1 << 30
RESERVE_BYTES = 2 * GIB


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    kv_cache: int
    activations: int
    cuda_graphs: int
    reserve: int = RESERVE_BYTES
    draft: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.cuda_graphs + self.reserve + self.draft


def weight_bytes(cfg: ModelConfig, build: BuildConfig, rank: int = 0) -> int:
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg, model_spec(build, rank))
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def kv_bytes_per_token(cfg: ModelConfig, build: BuildConfig) -> tuple[int, int]:
    """(global, local) bytes of K and V per token per rank, summed over layers of each kind."""
    elem = 1 if build.quant.kv_cache_algo == "FP8" else torch_dtype(build.dtype).itemsize
    per_layer = 2 * cfg.local_kv_heads(build.tp_size) * cfg.head_dim * elem
    return len(cfg.nope_layer_ids) * per_layer, len(cfg.rope_layer_ids) * per_layer


def activation_bytes(cfg: ModelConfig, build: BuildConfig, tokens: int, rows: int) -> int:
    tp, act = build.tp_size, torch_dtype(build.dtype).itemsize
    qkv = (cfg.local_heads(tp) + 2 * cfg.local_kv_heads(tp)) * cfg.head_dim
    ffn = 2 * max(cfg.intermediate_size_mlp // tp, cfg.intermediate_size // (tp // build.ep_size))
    per_token = act * (3 * cfg.hidden_size + qkv + cfg.local_heads(tp) * cfg.head_dim + 2 * ffn)
    if cfg.moe_layers:  # grouped expert GEMMs (many tokens): score-scaled copy, its FP8 copy, fp32 accumulator.
        # Without these the plan counted 0.16 GB for the graphs where their pool measured 0.27 (H200)
        per_token += (act + 1 + 4) * cfg.hidden_size
    logits = rows * cfg.padded_vocab_size(tp) * 4 * 4  # gathered fp32 logits, probs, sort values, indices
    return tokens * per_token + logits


def draft_slot_bytes(draft: Eagle3Config, build: BuildConfig) -> int:
    """Bytes an EAGLE-3 draft keeps per global KV slot: its layer's K and V, the target's fused feature."""
    return (2 * draft.num_key_value_heads * draft.head_dim + draft.hidden_size) * torch_dtype(build.dtype).itemsize


def draft_bytes(draft: Eagle3Config, build: BuildConfig, global_blocks: int) -> int:
    """A rank's EAGLE-3 draft: weights, KV cache and feature cache (both over the global pool + scratch)."""
    with torch.device("meta"):
        d = Eagle3Draft(draft, torch_dtype(build.dtype), build.tp_size)
    weights = sum(t.numel() * t.element_size() for t in d.state_dict().values())
    return weights + (global_blocks + 1) * build.kv_cache_block_size * draft_slot_bytes(draft, build)


def workspace_bytes(cfg: ModelConfig, build: BuildConfig) -> tuple[int, int]:
    """(activations of one step of max_num_tokens, the CUDA graphs' pool): what a rank needs beside weights
    and KV."""
    act = activation_bytes(cfg, build, build.max_num_tokens, build.max_batch_size)
    graphs = sum(activation_bytes(cfg, build, b, b) for b in build.graph_batch_sizes())
    graphs += max((activation_bytes(cfg, build, t, 1) for t in build.graph_prefill_tokens()), default=0)
    return act, graphs


def plan(cfg: ModelConfig, build: BuildConfig, draft: Eagle3Config | None = None) -> MemoryPlan:
    build = build.for_model(cfg)
    g, loc = kv_bytes_per_token(cfg, build)
    global_blocks, local_blocks = build.kv_pool_blocks(cfg)
    kv = (g * global_blocks + loc * local_blocks) * build.kv_cache_block_size
    act, graphs = workspace_bytes(cfg, build)
    return MemoryPlan(weight_bytes(cfg, build), kv, act, graphs,
                      draft=0 if draft is None else draft_bytes(draft, build, global_blocks))


def format_plan(cfg: ModelConfig, build: BuildConfig, p: MemoryPlan, gpu_memory_gb: float | None) -> str:
    def gb(x):
        return f"{x / 1e9:9.2f} GB"

    lines = [
        f"memory plan per rank: tp_size={build.tp_size} ep_size={build.ep_size} dtype={build.dtype} "
        f"quant={build.quant.algo or 'none'} kv_cache={build.quant.kv_cache_algo or build.dtype} "
        f"lm_head={build.lm_head_quant_algo or build.dtype}",
        f"  model: {cfg.num_parameters() / 1e9:.1f}B parameters, {cfg.num_hidden_layers} layers "
        f"({len(cfg.moe_layers)} MoE x {cfg.num_local_experts} experts), vocab {cfg.vocab_size}",
        f"  limits: max_batch_size={build.max_batch_size} max_seq_len={build.max_seq_len} "
        f"max_num_tokens={build.max_num_tokens}",
        f"  weights       {gb(p.weights)}",
        f"  kv cache      {gb(p.kv_cache)}  (global layers x max_seq_len, local layers x min(max_seq_len, chunk))",
        f"  activations   {gb(p.activations)}  (one step of max_num_tokens)",
        f"  cuda graphs   {gb(p.cuda_graphs)}  (batch sizes {build.graph_batch_sizes()}, prefill "
        f"tokens {build.graph_prefill_tokens()})",
        f"  reserve       {gb(p.reserve)}  (CUDA context, NCCL, allocator slack)",
        *([f"  eagle3 draft  {gb(p.draft)}  (weights, lm_head 1/{build.tp_size}; its KV and feature caches)"]
          if p.draft else []),
        f"  total         {gb(p.total)}",
    ]
    if gpu_memory_gb is not None:
        fits = p.total <= gpu_memory_gb * 1e9
        lines.append(f"  fits a {gpu_memory_gb:g} GB GPU: {'yes' if fits else 'NO'} "
                     f"({p.total / (gpu_memory_gb * 1e9):.0%} of it)")
    return "\n".join(lines)
