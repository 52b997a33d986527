"""Engine configs in YAML (configs/*.yaml): BuildConfig fields, strictly validated."""
from __future__ import annotations

from pathlib import Path

import yaml

from maverick.config import BuildConfig, ConfigError, SpeculativeConfig


def load_build_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: engine config not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of build options, got {type(data).__name__}")
    data.pop("description", None)  # free text for humans
    spec = data.pop("speculative_config", None)
    BuildConfig.from_dict(data, where=str(path))  # validate now: unknown keys, ranges
    if spec is not None:
        SpeculativeConfig.from_dict(spec, where=f"{path}: speculative_config")
        data["speculative_config"] = spec
    return data


def speculative_config_from(yaml_path: str | Path | None, model_dir: str | None, max_draft_len: int | None,
                            decoding_type: str | None) -> SpeculativeConfig | None:
    """TensorRT-LLM's speculative_config from the YAML, then the flags that were given; None without a draft."""
    spec = dict((load_build_yaml(yaml_path).get("speculative_config") or {}) if yaml_path else {})
    for key, value in (("speculative_model_dir", model_dir), ("max_draft_len", max_draft_len),
                       ("decoding_type", decoding_type)):
        if value is not None:
            spec[key] = value
    if not spec:
        return None
    return SpeculativeConfig.from_dict(spec, where=str(yaml_path or "command line"))


def build_config_from(yaml_path: str | Path | None, overrides: dict) -> BuildConfig:
    """YAML values, then command-line overrides (those that were given)."""
    data = load_build_yaml(yaml_path) if yaml_path else {}
    data.pop("speculative_config", None)  # speculative_config_from
    quant = dict(data.get("quant") or {})
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("algo", "kv_cache_algo"):
            quant[key] = value
        else:
            data[key] = value
    if quant:
        data["quant"] = quant
    return BuildConfig.from_dict(data, where=str(yaml_path or "command line"))
