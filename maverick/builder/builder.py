"""checkpoint -> engine directory: map, fuse, (re)quantize, shard, write, hash."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from maverick.checkpoint import CheckpointReader, open_checkpoint
from maverick.checkpoint.eagle3 import read_eagle3
from maverick.config import BuildConfig, ConfigError, SpeculativeConfig, torch_dtype

from .engine_format import CONFIG_FILE, DRAFT_FILE, PRODUCER, EngineConfig, EngineError, hash_files, is_engine_dir, rank_file
from .from_checkpoint import iter_rank_tensors
from .shard import iter_entries
from .spec import model_spec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "tokenizer.model")


def resolve_quant(reader: CheckpointReader, build: BuildConfig) -> BuildConfig:
    """The engine's quantization follows the checkpoint's; asking for FP8 from BF16 weights is an error."""
    ckpt = reader.quant
    if ckpt.kind == "none":
        if build.quant.algo is not None or build.quant.kv_cache_algo is not None:
            raise ConfigError(f"quant={build.quant.algo}/{build.quant.kv_cache_algo} asked for, but {reader.path} "
                              "holds unquantized weights: run quantize.py first (FP8 needs calibrated scales)")
        return build
    return build.replace(quant=ckpt.build_quant())


def build_engine(checkpoint: str | Path, output: str | Path, build: BuildConfig, progress: bool = True,
                 overwrite: bool = False, speculative: SpeculativeConfig | None = None) -> EngineConfig:
    """Write an engine for `build` (tp_size ranks) from a Hugging Face or ModelOpt checkpoint.

    The engine is written into a temporary sibling of `output` and swapped into place once complete, so a
    build killed at any moment leaves no directory that loads and keeps the engine that was there.
    overwrite: replace an existing engine at `output` (never a directory that is not one).
    speculative: an EAGLE-3 draft (speculative_model_dir) to write beside the target, checked against it."""
    reader = open_checkpoint(checkpoint)
    build = resolve_quant(reader, build).for_model(reader.config)
    build.validate_for(reader.config)
    draft = None
    if speculative is not None:
        if not speculative.speculative_model_dir:
            raise ConfigError("speculative_config: speculative_model_dir (--speculative-model) is required")
        dcfg, draft = read_eagle3(speculative.speculative_model_dir, reader.config, torch_dtype(build.dtype))
        speculative = dataclasses.replace(speculative, draft=dcfg,
                                          speculative_model_dir=str(Path(speculative.speculative_model_dir)))
    out = Path(output).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-{os.getpid()}-", dir=out.parent))
    try:
        cfg = _write(reader, build, tmp, progress, speculative, draft)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the new engine's temporary, or the old engine once swapped out
    return cfg


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EngineError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not is_engine_dir(out):
            raise EngineError(f"{out}: exists and is not an engine directory (no maverick config.json); "
                              "refusing to replace it")
        if not overwrite:
            raise EngineError(f"{out}: an engine is already there; pass --overwrite to replace it")


def remove_stale_temporaries(out: Path) -> None:
    """Temporaries of builds that were killed (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.building-*"):
        m = re.match(rf"\.{re.escape(out.name)}\.building-(\d+)-", p.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another build of this output is running
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def replace_dir(new: Path, out: Path) -> None:
    """Put directory `new` at `out` in one step: where out exists, the two are exchanged atomically
    (renameat2 RENAME_EXCHANGE), so `out` is always either the old engine or the new one; `new` then
    holds the old one."""
    if not out.exists():
        os.rename(new, out)
        return
    if _exchange(new, out):
        return
    old = out.with_name(f".{out.name}.building-{os.getpid()}-old")  # cleaned with the temporaries
    os.rename(out, old)
    os.rename(new, out)
    os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _write(reader: CheckpointReader, build: BuildConfig, out: Path, progress: bool,
           speculative: SpeculativeConfig | None = None, draft: dict | None = None) -> EngineConfig:
    entries = sum(1 for _ in iter_entries(reader.config))
    bar = tqdm(total=entries * build.tp_size, desc="build engine", unit="tensor", disable=not progress)
    for r in range(build.tp_size):
        tensors = {}
        for name, t in iter_rank_tensors(reader, model_spec(build, r)):
            tensors[name] = t
            bar.update(1)
        # one metadata key: safetensors writes a metadata map in a per-process random order, and a build must
        # be byte-for-byte reproducible (same checkpoint and options, same hashes)
        save_file(tensors, out / rank_file(r), metadata={"producer": f"{PRODUCER} rank {r}"})
        del tensors
    bar.close()
    if draft is not None:
        save_file({k: t.contiguous() for k, t in draft.items()}, out / DRAFT_FILE,
                  metadata={"producer": f"{PRODUCER} EAGLE-3 draft"})
    for name in TOKENIZER_FILES:
        if (reader.path / name).exists():
            shutil.copy(reader.path / name, out / name)
    paths = [p for p in sorted(out.iterdir()) if p.name != CONFIG_FILE]
    files = {p.name: digest for p, digest in hash_files(paths).items()}
    cfg = EngineConfig(reader.config, build, speculative, files)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
    return cfg
