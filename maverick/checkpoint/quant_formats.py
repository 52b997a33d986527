"""Which quantization format a checkpoint is in, and the extra tensors that format carries.

- ModelOpt FP8 (`hf_quant_config.json`, quant_method "modelopt"): every linear FP8 with scalar
  `weight_scale` and `input_scale`; stacked experts with one scalar pair per tensor; optional FP8 KV
  cache scales `k_proj.k_scale` / `v_proj.v_scale`. lm_head, router and embeddings stay high precision.
- Meta FP8 (compressed-tensors, "float-quantized"): routed experts only, FP8 with per-output-channel
  `weight_scale` [out, 1], activations dynamic per token; everything else BF16.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from maverick.config import ModelConfig, QuantConfig

from . import names as N
from .errors import CheckpointError

LINEAR_RULES = ("qkv", "gate_up", "columns")
EXPERT_RULES = ("experts_gate_up", "experts_down")


@dataclass(frozen=True)
class QuantFormat:
    kind: str = "none"  # "none" | "modelopt_fp8" | "meta_fp8"
    kv_cache_fp8: bool = False
    exclude_modules: tuple[str, ...] = ()

    def build_quant(self) -> QuantConfig:
        algo = {"none": None, "modelopt_fp8": "FP8", "meta_fp8": "FP8_PER_CHANNEL_PER_TOKEN"}[self.kind]
        return QuantConfig(algo=algo, kv_cache_algo="FP8" if self.kv_cache_fp8 else None,
                           exclude_modules=self.exclude_modules)

    @property
    def linears_fp8(self) -> bool:
        return self.kind == "modelopt_fp8"

    @property
    def experts_fp8(self) -> bool:
        return self.kind in ("modelopt_fp8", "meta_fp8")

    def fp8_sources(self, cfg: ModelConfig) -> set[str]:
        """Canonical names of the tensors stored in FP8."""
        out = set()
        for i in range(cfg.num_hidden_layers):
            for e in N.layer_entries(cfg, i):
                if (e.rule in LINEAR_RULES and self.linears_fp8) or (e.rule in EXPERT_RULES and self.experts_fp8):
                    out |= {N.layer_prefix(i) + s for s in e.sources}
        return out

    def expected_extra_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Scale tensors this format adds (canonical names -> shape)."""
        shapes: dict[str, tuple[int, ...]] = {}
        E, H, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        for name in self.fp8_sources(cfg):
            if name.endswith(".weight"):  # a linear
                base = name[: -len(".weight")]
                shapes[base + ".weight_scale"] = ()
                shapes[base + ".input_scale"] = ()
            elif self.kind == "modelopt_fp8":  # stacked experts, one scalar pair per tensor
                shapes[name + "_weight_scale"] = ()
                shapes[name + "_input_scale"] = ()
            else:  # Meta: per output channel, dynamic activations
                shapes[name + "_weight_scale"] = (E, 2 * I) if name.endswith("gate_up_proj") else (E, H)
        if self.kv_cache_fp8:
            for i in range(cfg.num_hidden_layers):
                p = N.layer_prefix(i) + "self_attn."
                shapes[p + "k_proj.k_scale"] = ()
                shapes[p + "v_proj.v_scale"] = ()
        return shapes


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None


def quantization_section(path: Path) -> tuple[dict, str] | None:
    """A checkpoint's quantization settings and where they were read (ModelOpt's hf_quant_config.json, whose
    'quantization' section wins, else config.json's quantization_config), or None for a plain checkpoint."""
    hq_file = path / "hf_quant_config.json"
    if hq_file.exists():
        q = _load_json(hq_file).get("quantization")
        if not isinstance(q, dict):
            raise CheckpointError(f"{hq_file}: missing the 'quantization' section")
        return q, str(hq_file)
    hf = _load_json(path / "config.json")
    qc = hf.get("quantization_config") or (hf.get("text_config") or {}).get("quantization_config")
    return (qc, f"{path / 'config.json'}: quantization_config") if qc else None


def detect_quant_format(path: Path) -> QuantFormat:
    found = quantization_section(path)
    if found is None:
        return QuantFormat()
    qc, where = found
    if where.endswith("hf_quant_config.json"):
        return _modelopt(qc, where)
    method = qc.get("quant_method")
    if method == "modelopt":
        return _modelopt(qc, where)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    raise CheckpointError(f"{path / 'config.json'}: quantization_config.quant_method={method!r} is not supported; "
                          "expected 'modelopt' (FP8) or 'compressed-tensors' (Meta FP8)")


def _modelopt(q: dict, where: str) -> QuantFormat:
    algo = q.get("quant_algo")
    if algo != "FP8":
        raise CheckpointError(f"{where}: quant_algo={algo!r} is not supported; expected 'FP8' "
                              "(per-tensor FP8 e4m3 from ModelOpt)")
    kv = q.get("kv_cache_quant_algo")
    if kv not in (None, "FP8"):
        raise CheckpointError(f"{where}: kv_cache_quant_algo={kv!r} is not supported; expected 'FP8' or null")
    exclude = tuple(q.get("exclude_modules") or q.get("ignore") or ())
    allowed = ("lm_head", "embed_tokens", "router", "vision_model", "multi_modal_projector")
    odd = [m for m in exclude if not any(a in m for a in allowed)]
    if odd:
        raise CheckpointError(f"{where}: exclude_modules lists {odd[:3]}: linears left unquantized inside the "
                              "decoder are not supported (mixed-precision layers); expected only lm_head, "
                              "embeddings, routers and vision modules")
    return QuantFormat("modelopt_fp8", kv == "FP8", exclude)


def _compressed_tensors(q: dict, where: str) -> QuantFormat:
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError(f"{where}: expected one config group (Meta FP8), found {len(groups)}")
    g = next(iter(groups.values()))
    w, a = g.get("weights") or {}, g.get("input_activations") or {}
    want = (w.get("num_bits"), w.get("type"), w.get("strategy"), a.get("dynamic"), a.get("strategy"))
    if want != (8, "float", "channel", True, "token"):
        raise CheckpointError(f"{where}: weights {w.get('num_bits')}-bit {w.get('type')} per {w.get('strategy')}, "
                              f"activations dynamic={a.get('dynamic')} per {a.get('strategy')}: not supported; expected "
                              "8-bit float weights per channel with dynamic per-token activations (Meta FP8)")
    return QuantFormat("meta_fp8", False, tuple(q.get("ignore") or ()))
