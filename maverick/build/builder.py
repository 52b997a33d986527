"""checkpoint -> engine directory: map, fuse, (re)quantize, shard, write, hash."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from maverick.checkpoint import CheckpointReader, open_checkpoint
from maverick.config import BuildConfig, ConfigError

from .engine_format import CONFIG_FILE, PRODUCER, EngineConfig, EngineError, rank_file, sha256_file
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


def _prepare_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        cfg = out / CONFIG_FILE
        is_engine = cfg.exists() and PRODUCER in cfg.read_text()[:4096]
        if not is_engine:
            raise EngineError(f"{out}: exists and is not an engine directory; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def build_engine(checkpoint: str | Path, output: str | Path, build: BuildConfig, progress: bool = True) -> EngineConfig:
    """Write an engine for `build` (tp_size ranks) from a Hugging Face or ModelOpt checkpoint."""
    reader = open_checkpoint(checkpoint)
    build = resolve_quant(reader, build)
    build.validate_for(reader.config)
    out = Path(output)
    _prepare_output(out)
    entries = sum(1 for _ in iter_entries(reader.config))
    bar = tqdm(total=entries * build.tp_size, desc="build engine", unit="tensor", disable=not progress)
    for r in range(build.tp_size):
        tensors = {}
        for name, t in iter_rank_tensors(reader, model_spec(build, r)):
            tensors[name] = t
            bar.update(1)
        save_file(tensors, out / rank_file(r), metadata={"producer": PRODUCER, "rank": str(r)})
        del tensors
    bar.close()
    for name in TOKENIZER_FILES:
        if (reader.path / name).exists():
            shutil.copy(reader.path / name, out / name)
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.name != CONFIG_FILE}
    cfg = EngineConfig(reader.config, build, None, files)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=1))
    tmp.rename(out / CONFIG_FILE)  # config.json appears last: a half-written engine has none
    return cfg
