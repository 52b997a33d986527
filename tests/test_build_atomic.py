"""Builds never lose data: the engine appears whole or not at all, an old engine survives a killed rebuild, a
directory that is not an engine is never replaced, and config.json cannot be edited unnoticed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maverick.builder.builder import build_engine
from maverick.builder.engine_format import EngineError, read_engine_config, verify_files
from maverick.config import BuildConfig

ROOT = Path(__file__).resolve().parent.parent
BUILD = BuildConfig(dtype="float32", max_seq_len=128, max_batch_size=2, max_num_tokens=32, kv_cache_block_size=8)


def _cli(ckpt, out, *extra):
    return [sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(ckpt), "--output", str(out),
            "--config", str(ROOT / "configs/cpu-tiny.yaml"), "--no-progress", *extra]


def test_checkpoint_that_mentions_maverick_is_never_replaced(tiny_ckpt, tmp_path):
    """A Hugging Face checkpoint whose config.json names 'maverick' (its _name_or_path) is not an engine."""
    import shutil

    ckpt = tmp_path / "meta-llama-maverick"
    shutil.copytree(tiny_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "meta-llama/Llama-4-Maverick"}))
    before = sorted(p.name for p in ckpt.iterdir())
    for overwrite in (False, True):
        with pytest.raises(EngineError, match="is not an engine directory"):
            build_engine(tiny_ckpt, ckpt, BUILD, progress=False, overwrite=overwrite)
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_rebuild_needs_overwrite_and_swaps_in_place(tiny_ckpt, tmp_path):
    out = tmp_path / "engine"
    build_engine(tiny_ckpt, out, BUILD, progress=False)
    with pytest.raises(EngineError, match="pass --overwrite"):
        build_engine(tiny_ckpt, out, BUILD, progress=False)
    build_engine(tiny_ckpt, out, BUILD.replace(max_seq_len=64), progress=False, overwrite=True)
    assert read_engine_config(out).build.max_seq_len == 64
    assert [p.name for p in tmp_path.iterdir()] == ["engine"]  # no temporaries left


def test_edited_config_is_refused(tiny_ckpt, tmp_path):
    out = tmp_path / "engine"
    build_engine(tiny_ckpt, out, BUILD, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["rms_norm_eps"] = 0.5
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EngineError, match="config_sha256 does not match"):
        read_engine_config(out)


def _kill_when(cmd, parent: Path, marker: str) -> bool:
    """Run a build and SIGKILL it as soon as `marker` exists in its temporary directory ("" = the directory
    itself); True if it was killed before it finished."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline:
        if any((d / marker).exists() for d in parent.glob(".engine.building-*") if d.is_dir()):
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.002)
    p.wait()
    return False


@pytest.mark.slow
def test_killed_rebuild_keeps_the_old_engine_and_leaves_nothing_that_loads(tiny_ckpt, tmp_path):
    """kill -9 at each stage of a rebuild over a good engine: as its temporary appears, once it holds a rank's
    weights, once its config.json is written (the swap comes next). The engine there is always whole."""
    out = tmp_path / "engine"
    build_engine(tiny_ckpt, out, BUILD.replace(max_seq_len=64), progress=False)
    kills = 0
    for marker in ("", "rank0.safetensors", "config.json"):
        kills += _kill_when(_cli(tiny_ckpt, out, "--overwrite"), tmp_path, marker)
        cfg = read_engine_config(out)  # the old engine or the finished new one, never half of either
        verify_files(out, cfg)
        assert cfg.build.max_seq_len in (64, 512)
    assert kills >= 2
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".engine.building-")]
    subprocess.run(_cli(tiny_ckpt, out, "--overwrite"), check=True, capture_output=True)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".engine.building-")], leftovers
    assert read_engine_config(out).build.max_seq_len == 512


def test_killed_first_build_leaves_no_directory_that_loads(tiny_ckpt, tmp_path):
    out = tmp_path / "fresh"
    p = subprocess.Popen(_cli(tiny_ckpt, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".fresh.building-*")):
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not out.exists()
    with pytest.raises(EngineError, match="does not exist"):
        read_engine_config(out)
