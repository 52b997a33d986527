"""The engine directory: config.json (model, build, speculative, file hashes) + rank{r}.safetensors.

Loading only checks: schema, version, hashes, names, shapes and dtypes are verified before any
device memory is used, and every failure names the file or tensor.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maverick.config import BuildConfig, ConfigError, ModelConfig

FORMAT_VERSION = 1
PRODUCER = "maverick"
CONFIG_FILE = "config.json"


class EngineError(ValueError):
    """An engine directory is missing, corrupted, foreign or built for something else."""


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    build: BuildConfig
    speculative: dict[str, Any] | None
    files: dict[str, str]  # file name -> sha256

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "producer": PRODUCER, "model": self.model.to_dict(),
                "build": self.build.to_dict(), "speculative": self.speculative, "files": self.files}


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_engine_config(engine_dir: str | Path) -> EngineConfig:
    engine_dir = Path(engine_dir)
    path = engine_dir / CONFIG_FILE
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: engine directory does not exist")
    if not path.exists():
        raise EngineError(f"{path}: missing (not an engine directory; build one with build_engine.py)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("producer") != PRODUCER:
        raise EngineError(f"{path}: not a maverick engine (producer={raw.get('producer') if isinstance(raw, dict) else None!r}, "
                          f"expected {PRODUCER!r}); a Hugging Face checkpoint must be built first")
    if raw.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: format_version={raw.get('format_version')!r}, expected {FORMAT_VERSION}; "
                          "rebuild the engine with this version of build_engine.py")
    unknown = sorted(set(raw) - {"format_version", "producer", "model", "build", "speculative", "files"})
    if unknown:
        raise EngineError(f"{path}: unknown key(s) {unknown}")
    try:
        return EngineConfig(ModelConfig.from_dict(raw["model"]), BuildConfig.from_dict(raw["build"]),
                            raw.get("speculative"), dict(raw["files"]))
    except (ConfigError, KeyError, TypeError) as e:
        raise EngineError(f"{path}: invalid engine config ({e})") from None


def verify_files(engine_dir: str | Path, cfg: EngineConfig) -> None:
    """Every listed file exists and has its recorded sha256; every rank has its weights."""
    engine_dir = Path(engine_dir)
    for r in range(cfg.build.tp_size):
        if rank_file(r) not in cfg.files:
            raise EngineError(f"{engine_dir / CONFIG_FILE}: no entry for {rank_file(r)} (engine has tp_size="
                              f"{cfg.build.tp_size})")
    for name, digest in cfg.files.items():
        p = engine_dir / name
        if not p.exists():
            raise EngineError(f"{p}: missing (listed in config.json)")
        got = sha256_file(p)
        if got != digest:
            raise EngineError(f"{p}: sha256 {got[:12]}... does not match config.json ({digest[:12]}...): "
                              "the file is corrupted or truncated")


def check_tensors(path: Path, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Compare a rank file's header (names, shapes, dtypes) with what the model expects."""
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:
        raise EngineError(f"{path}: not a readable safetensors file ({e})") from None
    have = set(f.keys())
    missing = sorted(set(expected) - have)
    if missing:
        raise EngineError(f"{path}: missing tensor '{missing[0]}' (expected shape {list(expected[missing[0]][0])})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(have - set(expected))
    if extra:
        raise EngineError(f"{path}: unexpected tensor '{extra[0]}'" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, (shape, dtype) in expected.items():
        sl = f.get_slice(name)
        got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
        if got_shape != tuple(shape) or got_dtype != dtype:
            raise EngineError(f"{path}: tensor '{name}' is {got_dtype}{list(got_shape)}, expected {dtype}{list(shape)}")


# safetensors' dtype names for the torch dtypes the engine stores
SAFETENSORS_DTYPE = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16",
                     "torch.float8_e4m3fn": "F8_E4M3", "torch.int64": "I64", "torch.int32": "I32"}
