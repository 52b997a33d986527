"""The one explicit name table between Hugging Face Llama 4 tensors and engine tensors.

Canonical checkpoint names are those of `Llama4ForCausalLM` (`model.layers.N...`, `lm_head.weight`);
readers map other layouts onto them. Each engine tensor is made from one or more checkpoint
tensors by a named sharding rule (implemented in maverick.builder.shard).
"""
from __future__ import annotations

from dataclasses import dataclass

from maverick.config import ModelConfig


@dataclass(frozen=True)
class Entry:
    engine: str  # engine tensor name (per layer: relative to "layers.{i}.")
    sources: tuple[str, ...]  # checkpoint tensors (per layer: relative to "model.layers.{i}.")
    rule: str  # how the builder fuses and shards them (see maverick.builder.shard.RULES)


GLOBAL = (
    Entry("embed_tokens.weight", ("model.embed_tokens.weight",), "vocab_rows"),
    Entry("norm.weight", ("model.norm.weight",), "replicate"),
    Entry("lm_head.weight", ("lm_head.weight",), "vocab_rows"),
)
ATTENTION = (
    Entry("input_layernorm.weight", ("input_layernorm.weight",), "replicate"),
    Entry("post_attention_layernorm.weight", ("post_attention_layernorm.weight",), "replicate"),
    Entry("self_attn.qkv_proj.weight",
          ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    Entry("self_attn.o_proj.weight", ("self_attn.o_proj.weight",), "columns"),
)
DENSE = (
    Entry("feed_forward.gate_up_proj.weight",
          ("feed_forward.gate_proj.weight", "feed_forward.up_proj.weight"), "gate_up"),
    Entry("feed_forward.down_proj.weight", ("feed_forward.down_proj.weight",), "columns"),
)
MOE = (
    Entry("feed_forward.router.weight", ("feed_forward.router.weight",), "replicate"),
    Entry("feed_forward.experts.gate_up_proj", ("feed_forward.experts.gate_up_proj",), "experts_gate_up"),
    Entry("feed_forward.experts.down_proj", ("feed_forward.experts.down_proj",), "experts_down"),
    Entry("feed_forward.shared_expert.gate_up_proj.weight",
          ("feed_forward.shared_expert.gate_proj.weight", "feed_forward.shared_expert.up_proj.weight"), "gate_up"),
    Entry("feed_forward.shared_expert.down_proj.weight", ("feed_forward.shared_expert.down_proj.weight",), "columns"),
)

# Tensors of the multimodal checkpoint that a text engine does not use.
IGNORED_PREFIXES = ("vision_model.", "multi_modal_projector.")
# Llama4ForConditionalGeneration nests the text model under this prefix.
MULTIMODAL_PREFIX = "language_model."


def layer_entries(cfg: ModelConfig, layer: int) -> tuple[Entry, ...]:
    return ATTENTION + (MOE if cfg.is_moe_layer(layer) else DENSE)


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical checkpoint tensor name -> shape, for the high-precision weights."""
    H, V, E, I = cfg.hidden_size, cfg.vocab_size, cfg.num_local_experts, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (cfg.q_size, H), p + "self_attn.k_proj.weight": (cfg.kv_size, H),
            p + "self_attn.v_proj.weight": (cfg.kv_size, H), p + "self_attn.o_proj.weight": (H, cfg.q_size),
        })
        if cfg.is_moe_layer(i):
            shapes.update({
                p + "feed_forward.router.weight": (E, H),
                p + "feed_forward.experts.gate_up_proj": (E, H, 2 * I),
                p + "feed_forward.experts.down_proj": (E, I, H),
                p + "feed_forward.shared_expert.gate_proj.weight": (I, H),
                p + "feed_forward.shared_expert.up_proj.weight": (I, H),
                p + "feed_forward.shared_expert.down_proj.weight": (H, I),
            })
        else:
            M = cfg.intermediate_size_mlp
            shapes.update({
                p + "feed_forward.gate_proj.weight": (M, H), p + "feed_forward.up_proj.weight": (M, H),
                p + "feed_forward.down_proj.weight": (H, M),
            })
    return shapes
