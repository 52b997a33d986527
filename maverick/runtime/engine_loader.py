"""Load one rank of an engine: verify everything on the host, then copy weights to the device."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from maverick.builder.engine_format import (DRAFT_FILE, SAFETENSORS_DTYPE, EngineConfig, EngineError,
                                          check_tensors, rank_file, read_engine_config, verify_files)
from maverick.builder.spec import model_spec
from maverick.config import torch_dtype
from maverick.models import Llama4ForCausalLM
from maverick.models.eagle3 import Eagle3Draft


def open_engine(engine_dir: str | Path, tp_size: int | None = None, verify: bool = True) -> EngineConfig:
    """Read and check an engine's config (and, with verify, every file's sha256)."""
    cfg = read_engine_config(engine_dir)
    if tp_size is not None and tp_size != cfg.build.tp_size:
        raise EngineError(f"{engine_dir}: engine was built for tp_size={cfg.build.tp_size}, "
                          f"but tp_size={tp_size} was requested; rebuild it with --tp-size {tp_size}")
    if verify:
        verify_files(engine_dir, cfg)
    return cfg


def load_rank_model(engine_dir: str | Path, cfg: EngineConfig, rank: int, device: torch.device,
                    progress: bool = False) -> Llama4ForCausalLM:
    path = Path(engine_dir) / rank_file(rank)
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg.model, model_spec(cfg.build, rank))
    expected = {n: (tuple(t.shape), SAFETENSORS_DTYPE[str(t.dtype)]) for n, t in model.state_dict().items()}
    check_tensors(path, expected)  # names, shapes, dtypes: before any device memory is used
    tensors = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:  # 50 GB a rank at TP8: show progress
        for name in tqdm(list(f.keys()), desc=f"load engine rank {rank}", unit="tensor", disable=not progress):
            tensors[name] = f.get_tensor(name)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device).eval()


def load_draft(engine_dir: str | Path, cfg: EngineConfig, device: torch.device, rank: int = 0) -> Eagle3Draft | None:
    """The engine's EAGLE-3 draft for this rank (the layer whole, lm_head's rows of this rank: read as a slice
    of draft.safetensors), or None without speculative_config."""
    if cfg.speculative is None:
        return None
    path = Path(engine_dir) / DRAFT_FILE
    dcfg, dtype, tp = cfg.speculative.draft, torch_dtype(cfg.build.dtype), cfg.build.tp_size
    with torch.device("meta"):
        whole = Eagle3Draft(dcfg, dtype)
        draft = Eagle3Draft(dcfg, dtype, tp, rank)
    expected = {n: (tuple(t.shape), SAFETENSORS_DTYPE[str(t.dtype)]) for n, t in whole.state_dict().items()}
    check_tensors(path, expected)
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        tensors = {name: f.get_tensor(name) for name in f.keys() if name != "lm_head.weight"}
        rows = draft.vocab_rows
        tensors["lm_head.weight"] = draft.shard_lm_head(f.get_slice("lm_head.weight")[rank * rows:(rank + 1) * rows])
    draft.load_state_dict(tensors, strict=True, assign=True)
    return draft.to(device).eval()
