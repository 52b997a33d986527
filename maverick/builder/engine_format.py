"""The engine directory: config.json (model, build, speculative, file hashes, its own checksum) +
rank{r}.safetensors.

Loading only checks: schema, version, checksum, hashes, names, shapes and dtypes are verified before any
device memory is used, and every failure names the file or tensor.

A file's hash is the sha256 of the sha256s of its 64 MiB pieces, hashed on all cores at once: one sha256
stream runs at about 1 GB/s, so a TP8 Maverick engine (400 GB) took minutes to verify file by file.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maverick.config import BuildConfig, ConfigError, ModelConfig, SpeculativeConfig

FORMAT_VERSION = 3
PRODUCER = "maverick"
CONFIG_FILE = "config.json"
HASH_PIECE = 64 << 20
KEYS = {"format_version", "producer", "model", "build", "speculative", "files", "config_sha256"}


class EngineError(ValueError):
    """An engine directory is missing, corrupted, foreign or built for something else."""


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    build: BuildConfig
    speculative: SpeculativeConfig | None
    files: dict[str, str]  # file name -> sha256

    def to_dict(self) -> dict[str, Any]:
        body = {"format_version": FORMAT_VERSION, "producer": PRODUCER, "model": self.model.to_dict(),
                "build": self.build.to_dict(),
                "speculative": None if self.speculative is None else self.speculative.to_dict(), "files": self.files}
        return {**body, "config_sha256": config_checksum(body)}


def config_checksum(body: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON (every key but this one): an edit of any value is caught."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_engine_dir(path: Path) -> bool:
    """Whether `path` holds a maverick engine, by its config's schema (producer and format_version keys)."""
    try:
        raw = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("producer") == PRODUCER and "format_version" in raw


DRAFT_FILE = "draft.safetensors"  # the EAGLE-3 head, replicated on every rank


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"


_BUFFERS = threading.local()


def _piece_digest(path: Path, offset: int) -> bytes:
    # one reused buffer a thread: a fresh 64 MiB read faulted in new pages every piece and kept two threads
    # at one's speed; hashlib releases the GIL, so the threads hash in parallel
    buf = getattr(_BUFFERS, "buf", None)
    if buf is None:
        buf = _BUFFERS.buf = bytearray(HASH_PIECE)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        n = f.readinto(buf)
    return hashlib.sha256(memoryview(buf)[:n]).digest()


def hash_files(paths: list[Path], workers: int | None = None) -> dict[Path, str]:
    """Each file's hash (sha256 over the sha256s of its HASH_PIECE pieces), all pieces hashed in parallel."""
    jobs = [(p, off) for p in paths for off in range(0, max(os.path.getsize(p), 1), HASH_PIECE)]
    with ThreadPoolExecutor(workers or min(32, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda j: _piece_digest(*j), jobs))
    out: dict[Path, hashlib._Hash] = {p: hashlib.sha256() for p in paths}
    for (p, _), d in zip(jobs, digests):
        out[p].update(d)
    return {p: h.hexdigest() for p, h in out.items()}


def sha256_file(path: Path) -> str:
    """One file's hash, as config.json records it (see hash_files)."""
    return hash_files([Path(path)])[Path(path)]


def read_engine_config(engine_dir: str | Path) -> EngineConfig:
    engine_dir = Path(engine_dir)
    path = engine_dir / CONFIG_FILE
    if engine_dir.is_file():
        raise EngineError(f"{engine_dir}: is a file, not an engine directory (give the directory build_engine.py "
                          "wrote)")
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
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise EngineError(f"{path}: unknown key(s) {unknown}")
    body = {k: v for k, v in raw.items() if k != "config_sha256"}
    if raw.get("config_sha256") != config_checksum(body):
        raise EngineError(f"{path}: config_sha256 does not match the config's contents: the file was edited or "
                          "corrupted after the build; rebuild the engine (build_engine.py)")
    try:
        spec = raw.get("speculative")
        spec = None if spec is None else SpeculativeConfig.from_dict(spec, "speculative")
        if spec is not None and (spec.draft is None or DRAFT_FILE not in raw["files"]):
            raise ConfigError(f"speculative: an engine's draft needs its config ('draft') and {DRAFT_FILE}")
        return EngineConfig(ModelConfig.from_dict(raw["model"]), BuildConfig.from_dict(raw["build"]), spec,
                            dict(raw["files"]))
    except (ConfigError, KeyError, TypeError) as e:
        raise EngineError(f"{path}: invalid engine config ({e})") from None


def verify_files(engine_dir: str | Path, cfg: EngineConfig, names: list[str] | None = None) -> None:
    """The listed files (all, or `names`) exist and have their recorded hashes; every rank has its weights."""
    engine_dir = Path(engine_dir)
    for r in range(cfg.build.tp_size):
        if rank_file(r) not in cfg.files:
            raise EngineError(f"{engine_dir / CONFIG_FILE}: no entry for {rank_file(r)} (engine has tp_size="
                              f"{cfg.build.tp_size})")
    names = list(cfg.files) if names is None else names
    for name in names:
        if not (engine_dir / name).exists():
            raise EngineError(f"{engine_dir / name}: missing (listed in config.json)")
    got = hash_files([engine_dir / n for n in names])
    for name in names:
        digest = cfg.files[name]
        if got[engine_dir / name] != digest:
            raise EngineError(f"{engine_dir / name}: hash {got[engine_dir / name][:12]}... does not match "
                              f"config.json ({digest[:12]}...): the file is corrupted or truncated")


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
