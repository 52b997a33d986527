"""EAGLE-3 draft checkpoints as NVIDIA and the EAGLE authors publish them (LlamaForCausalLMEagle3):
config.json with `eagle_config.eagle_aux_hidden_state_layer_ids`, and `fc`, `midlayer.*`, `norm`, `lm_head`,
optional `d2t` tensors. Read, checked against the target model, and mapped to the engine's names (q|k|v
and gate|up fused); every missing or misshapen tensor is named."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from maverick.config import ConfigError, Eagle3Config, ModelConfig

from .errors import CheckpointError
from .safetensors_files import SafetensorsFiles

IGNORED = ("embed_tokens.weight", "t2d")  # the target's embedding is used; t2d is d2t's inverse


def _shapes(c: Eagle3Config) -> dict[str, tuple[int, ...]]:
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    m = "midlayer."
    return {
        "fc.weight": (H, 3 * c.target_hidden_size),
        m + "input_layernorm.weight": (H,), m + "hidden_norm.weight": (H,),
        m + "post_attention_layernorm.weight": (H,),
        m + "self_attn.q_proj.weight": (c.num_attention_heads * D, 2 * H),
        m + "self_attn.k_proj.weight": (c.num_key_value_heads * D, 2 * H),
        m + "self_attn.v_proj.weight": (c.num_key_value_heads * D, 2 * H),
        m + "self_attn.o_proj.weight": (H, c.num_attention_heads * D),
        m + "mlp.gate_proj.weight": (I, H), m + "mlp.up_proj.weight": (I, H), m + "mlp.down_proj.weight": (H, I),
        "norm.weight": (H,), "lm_head.weight": (c.draft_vocab_size, H),
    }


def draft_config(path: str | Path, target: ModelConfig) -> Eagle3Config:
    """The config of the draft at `path` (its config.json), checked against `target`."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an EAGLE-3 draft checkpoint)")
    try:
        return Eagle3Config.from_hf(json.loads(cfg_file.read_text()), target)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def read_eagle3(path: str | Path, target: ModelConfig, dtype: torch.dtype) -> tuple[Eagle3Config, dict]:
    """(config, {engine name: tensor in dtype; d2t int64}) of the draft at `path`, for `target`."""
    path = Path(path)
    cfg = draft_config(path, target)
    files = SafetensorsFiles(path)
    names = {n.removeprefix("model."): n for n in files.names()}
    shapes = _shapes(cfg)
    missing = sorted(set(shapes) - set(names))
    if missing:
        raise CheckpointError(f"{path}: EAGLE-3 tensor(s) missing: {missing}")
    unknown = sorted(set(names) - set(shapes) - {"d2t", *IGNORED})
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unknown}; expected {sorted(shapes)} and d2t")
    got = {}
    for name, shape in shapes.items():
        have = files.shape(names[name])
        if have != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(have)}, expected {list(shape)} "
                                  f"(from config.json: hidden_size {cfg.hidden_size}, heads {cfg.num_attention_heads}"
                                  f"/{cfg.num_key_value_heads} x {cfg.head_dim}, intermediate_size "
                                  f"{cfg.intermediate_size}, draft_vocab_size {cfg.draft_vocab_size})")
        got[name] = files.get(names[name]).to(dtype)
    if "d2t" in names:
        d2t = files.get(names["d2t"])
        if tuple(d2t.shape) != (cfg.draft_vocab_size,) or d2t.is_floating_point():
            raise CheckpointError(f"{path}: tensor 'd2t' is {d2t.dtype} {list(d2t.shape)}, expected integers "
                                  f"[{cfg.draft_vocab_size}]")
        d2t = d2t.long()
        target_ids = torch.arange(cfg.draft_vocab_size) + d2t
        bad = (target_ids < 0) | (target_ids >= cfg.vocab_size)
        if bad.any():
            raise CheckpointError(f"{path}: d2t maps draft id {int(bad.nonzero()[0])} outside the target's "
                                  f"vocabulary of {cfg.vocab_size}")
    elif cfg.draft_vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{path}: draft_vocab_size {cfg.draft_vocab_size} < vocab_size {cfg.vocab_size} "
                              "needs a 'd2t' tensor (draft id -> target id offsets)")
    else:
        d2t = torch.zeros(cfg.draft_vocab_size, dtype=torch.int64)
    m = "midlayer."
    weights = {
        "fc": got["fc.weight"],
        m + "input_layernorm.weight": got[m + "input_layernorm.weight"],
        m + "hidden_norm.weight": got[m + "hidden_norm.weight"],
        m + "post_attention_layernorm.weight": got[m + "post_attention_layernorm.weight"],
        m + "qkv_proj": torch.cat([got[m + f"self_attn.{p}_proj.weight"] for p in "qkv"]),
        m + "o_proj": got[m + "self_attn.o_proj.weight"],
        m + "gate_up_proj": torch.cat([got[m + "mlp.gate_proj.weight"], got[m + "mlp.up_proj.weight"]]),
        m + "down_proj": got[m + "mlp.down_proj.weight"],
        "norm.weight": got["norm.weight"], "lm_head": got["lm_head.weight"], "d2t": d2t,
    }
    return cfg, weights
