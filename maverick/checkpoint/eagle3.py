"""EAGLE-3 draft checkpoints as NVIDIA and the EAGLE authors publish them (LlamaForCausalLMEagle3):
config.json with `eagle_config.eagle_aux_hidden_state_layer_ids`, and `fc`, `midlayer.*`, `norm`, `lm_head`,
optional `d2t` tensors; in ModelOpt's FP8 export, e4m3 weights with per-tensor `weight_scale` and
`input_scale`. Read, checked against the target model, and mapped to the engine's names (q|k|v and gate|up
fused); every missing or misshapen tensor is named."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from maverick.config import ConfigError, Eagle3Config, ModelConfig

from .errors import CheckpointError
from .quant_formats import quantization_section
from .safetensors_files import SafetensorsFiles

IGNORED = ("embed_tokens.weight", "t2d")  # the target's embedding is used; t2d is d2t's inverse
# A ModelOpt FP8 export may carry KV scales; the draft's one-layer KV cache stays in the compute dtype
IGNORED_SUFFIXES = ("k_proj.k_scale", "v_proj.v_scale")
M = "midlayer."
# engine linear -> the checkpoint linears fused into it, in order
SOURCES = {"fc": ("fc",), "qkv_proj": tuple(f"{M}self_attn.{p}_proj" for p in "qkv"),
           "o_proj": (M + "self_attn.o_proj",), "gate_up_proj": (M + "mlp.gate_proj", M + "mlp.up_proj"),
           "down_proj": (M + "mlp.down_proj",), "lm_head": ("lm_head",)}
NORMS = (M + "input_layernorm.weight", M + "hidden_norm.weight", M + "post_attention_layernorm.weight",
         "norm.weight")
FP8 = "F8_E4M3"


def _shapes(c: Eagle3Config) -> dict[str, tuple[int, ...]]:
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    return {
        "fc.weight": (H, 3 * c.target_hidden_size),
        **{n: (H,) for n in NORMS},
        M + "self_attn.q_proj.weight": (c.num_attention_heads * D, 2 * H),
        M + "self_attn.k_proj.weight": (c.num_key_value_heads * D, 2 * H),
        M + "self_attn.v_proj.weight": (c.num_key_value_heads * D, 2 * H),
        M + "self_attn.o_proj.weight": (H, c.num_attention_heads * D),
        M + "mlp.gate_proj.weight": (I, H), M + "mlp.up_proj.weight": (I, H), M + "mlp.down_proj.weight": (H, I),
        "lm_head.weight": (c.draft_vocab_size, H),
    }


def _names(files: SafetensorsFiles) -> dict[str, str]:
    """Checkpoint names without a `model.` prefix -> the names in the files."""
    return {n.removeprefix("model."): n for n in files.names()}


def _fp8_linears(path: Path, files: SafetensorsFiles, names: dict[str, str]) -> tuple[str, ...]:
    """The engine linears whose checkpoint weights are FP8 e4m3 (ModelOpt's export keeps lm_head, and whatever
    else it was told to exclude, in high precision), checked against the checkpoint's quantization config."""
    fp8 = []
    for engine, sources in SOURCES.items():
        dtypes = {s: files.dtype_name(names[s + ".weight"]) for s in sources if s + ".weight" in names}
        odd = {s: d for s, d in dtypes.items() if d.startswith("F8") and d != FP8}
        if odd:
            raise CheckpointError(f"{path}: {odd}: FP8 weights must be e4m3 ({FP8}, ModelOpt's FP8)")
        stored = {d == FP8 for d in dtypes.values()}
        if len(stored) == 2:
            raise CheckpointError(f"{path}: {list(sources)} are fused into one {engine} but only some are FP8 "
                                  f"({dtypes}); expected all or none")
        if stored == {True}:
            fp8.append(engine)
    algo = _quant_algo(path)
    if fp8 and algo != "FP8":
        raise CheckpointError(f"{path}: {fp8} are stored in FP8 but the checkpoint's quantization config says "
                              f"quant_algo={algo!r}; expected 'FP8' (hf_quant_config.json or config.json's "
                              "quantization_config, as ModelOpt exports)")
    if algo is not None and algo != "FP8":
        raise CheckpointError(f"{path}: quant_algo={algo!r} is not supported for an EAGLE-3 draft; expected 'FP8'")
    return tuple(fp8)


def _quant_algo(path: Path) -> str | None:
    found = quantization_section(path)
    return None if found is None else found[0].get("quant_algo")


def draft_config(path: str | Path, target: ModelConfig) -> Eagle3Config:
    """The config of the draft at `path` (its config.json, and which linears its weights store in FP8), checked
    against `target`."""
    return _open(Path(path), target)[0]


def _open(path: Path, target: ModelConfig) -> tuple[Eagle3Config, SafetensorsFiles, dict[str, str]]:
    """The draft's config, its open weight files and their names without the `model.` prefix."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (expected an EAGLE-3 draft checkpoint)")
    try:
        cfg = Eagle3Config.from_hf(json.loads(cfg_file.read_text()), target)
        files = SafetensorsFiles(path)
        names = _names(files)
        return dataclasses.replace(cfg, fp8_linears=_fp8_linears(path, files, names)), files, names
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: a config file is not valid JSON ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def read_eagle3(path: str | Path, target: ModelConfig, dtype: torch.dtype) -> tuple[Eagle3Config, dict]:
    """(config, {engine name: tensor}) of the draft at `path`, for `target`: high-precision weights in dtype,
    FP8 ones as stored with fp32 `weight_scale` (one per output row where sources are fused: each keeps its own
    scale, exactly) and `input_scale` (the largest of the fused sources': they read the same activation)."""
    path = Path(path)
    cfg, files, names = _open(path, target)
    shapes = _shapes(cfg)
    scales = {f"{s}.{kind}" for e in cfg.fp8_linears for s in SOURCES[e] for kind in ("weight_scale", "input_scale")}
    missing = sorted(set(shapes) - set(names)) + sorted(scales - set(names))
    if missing:
        raise CheckpointError(f"{path}: EAGLE-3 tensor(s) missing: {missing}")
    unknown = sorted(n for n in set(names) - set(shapes) - scales - {"d2t", *IGNORED}
                     if not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensor(s) {unknown}; expected {sorted(shapes)}, d2t"
                              + (", and weight_scale/input_scale of the FP8 linears" if scales else ""))
    for name, shape in shapes.items():
        have = files.shape(names[name])
        if have != shape:
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(have)}, expected {list(shape)} "
                                  f"(from config.json: hidden_size {cfg.hidden_size}, heads {cfg.num_attention_heads}"
                                  f"/{cfg.num_key_value_heads} x {cfg.head_dim}, intermediate_size "
                                  f"{cfg.intermediate_size}, draft_vocab_size {cfg.draft_vocab_size})")
    for name in sorted(scales):
        if files.shape(names[name]) not in ((), (1,)):
            raise CheckpointError(f"{path}: tensor '{name}' has shape {list(files.shape(names[name]))}, expected a "
                                  "scalar (ModelOpt's per-tensor FP8 scale)")
    weights = {n: files.get(names[n]).to(dtype) for n in NORMS}
    for engine, sources in SOURCES.items():
        prefix = engine if engine in ("fc", "lm_head") else M + engine
        parts = [files.get(names[s + ".weight"]) for s in sources]
        if engine not in cfg.fp8_linears:
            weights[prefix + ".weight"] = torch.cat([p.to(dtype) for p in parts])
            continue
        weights[prefix + ".weight"] = torch.cat([p.view(torch.uint8) for p in parts]).view(torch.float8_e4m3fn)
        ws = [files.get(names[s + ".weight_scale"]).float().reshape(()) for s in sources]
        weights[prefix + ".weight_scale"] = (ws[0] if len(ws) == 1 else
                                             torch.cat([w.expand(p.shape[0]) for w, p in zip(ws, parts)]))
        weights[prefix + ".input_scale"] = torch.stack(
            [files.get(names[s + ".input_scale"]).float().reshape(()) for s in sources]).max()
    weights["d2t"] = _d2t(path, cfg, files, names)
    return cfg, weights


def _d2t(path: Path, cfg: Eagle3Config, files: SafetensorsFiles, names: dict[str, str]) -> torch.Tensor:
    """Draft id -> target id offsets, checked to land in the target's vocabulary (zeros without a d2t tensor
    where the vocabularies are the same)."""
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
        return d2t
    if cfg.draft_vocab_size != cfg.vocab_size:
        raise CheckpointError(f"{path}: draft_vocab_size {cfg.draft_vocab_size} < vocab_size {cfg.vocab_size} "
                              "needs a 'd2t' tensor (draft id -> target id offsets)")
    return torch.zeros(cfg.draft_vocab_size, dtype=torch.int64)
