"""Which quantization format a checkpoint is in, and the extra tensors that format carries."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from maverick.config import ModelConfig

from .errors import CheckpointError


@dataclass(frozen=True)
class QuantFormat:
    kind: str = "none"  # "none" | "modelopt_fp8" | "meta_fp8"
    kv_cache_fp8: bool = False
    exclude_modules: tuple[str, ...] = field(default_factory=tuple)

    def expected_extra_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        return {}


def detect_quant_format(path: Path) -> QuantFormat:
    cfg_file = path / "config.json"
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read ({e})") from None
    qc = hf.get("quantization_config") or (hf.get("text_config") or {}).get("quantization_config")
    if (path / "hf_quant_config.json").exists() or qc:
        raise CheckpointError(f"{path}: quantized checkpoints are not supported by this build")
    return QuantFormat()
