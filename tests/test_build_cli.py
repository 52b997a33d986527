"""build_engine.py: YAML configs, flag overrides, dry-run memory plans, errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from maverick.builder.cli import main as build_main
from maverick.builder.engine_format import FORMAT_VERSION
from maverick.builder.memory_plan import plan
from maverick.builder.yaml_config import build_config_from, load_build_yaml
from maverick.config import BuildConfig, ConfigError, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_all_expected_configs_exist():
    names = {c.stem for c in CONFIGS}
    assert {"dgx-b200-tp8-min-latency", "dgx-b200-tp8-max-throughput", "h200-tp8", "h200-tp4", "h100-tp8",
            "cpu-tiny"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_dry_run_full_maverick(config, capsys):
    assert build_main(["--preset", "maverick", "--config", str(config), "--dry-run", "--gpu-memory-gb", "141"]) == 0
    out = capsys.readouterr().out
    assert "weights" in out and "kv cache" in out and "fits a 141 GB GPU" in out


def test_memory_plan_numbers():
    cfg = ModelConfig.preset("maverick")
    fp8 = BuildConfig.from_dict(load_build_yaml(ROOT / "configs/dgx-b200-tp8-min-latency.yaml"))
    p = plan(cfg, fp8)
    assert 48e9 < p.weights < 53e9  # about 400B FP8 parameters / 8, plus BF16 embeddings, router, lm_head
    # KV: 12 global layers x 16384 tokens + 36 local layers x 8192 tokens, 1 kv head x 128 x 2 (K,V) x 1 byte, 8 seqs
    assert p.kv_cache == 8 * (12 * 16384 + 36 * 8192) * 2 * 128
    bf16_tp4 = BuildConfig(tp_size=4)
    assert plan(cfg, bf16_tp4).weights > 195e9  # BF16 at TP4 cannot fit one GPU


def test_fit_verdict(capsys):
    build_main(["--preset", "maverick", "--tp-size", "4", "--dry-run", "--gpu-memory-gb", "80"])
    assert "fits a 80 GB GPU: NO" in capsys.readouterr().out


def test_flags_override_yaml():
    b = build_config_from(ROOT / "configs/h200-tp8.yaml", dict(tp_size=4, max_batch_size=3, dtype=None))
    assert (b.tp_size, b.max_batch_size, b.max_seq_len, b.quant.algo) == (4, 3, 16384, "FP8")


@pytest.mark.parametrize("text,match", [
    ("tp_size: 8\nmax_batch: 4\n", r"unknown key\(s\) \['max_batch'\]"),
    ("tp_size: 0\n", r"tp_size=0: expected an integer in \[1, 64\]"),
    ("max_seq_len: -5\n", r"max_seq_len=-5"),
    ("dtype: float8\n", r"dtype='float8'"),
    ("quant:\n  algo: INT4\n", r"quant.algo='INT4'"),
    ("quant:\n  algo: FP8\n  scheme: x\n", r"unknown key\(s\) \['scheme'\]"),
    ("tp_size: 4\nep_size: 3\n", r"ep_size=3: expected a divisor of tp_size=4"),
    ("- a\n- b\n", "expected a mapping"),
    ("cuda_graph_prefill_tokens: 128\n", "cuda_graph_prefill_tokens must be a list of positive integers, got 128"),
    ("cuda_graph_prefill_tokens: [128, 0]\n", r"cuda_graph_prefill_tokens=\(128, 0\): expected a list of positive"),
    ("cuda_graph_batch_sizes: [1, two]\n", r"cuda_graph_batch_sizes=\(1, 'two'\): expected a list of positive"),
])
def test_yaml_rejects_bad_configs(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_build_yaml(f)


def test_tp_not_dividing_heads_is_an_error(capsys):
    assert build_main(["--preset", "maverick", "--tp-size", "3", "--dry-run"]) == 2
    assert "num_attention_heads (per tp_size)=40 must be divisible by 3" in capsys.readouterr().err


def test_build_cli_writes_engine(tiny_ckpt, tmp_path):
    out = tmp_path / "eng"
    r = subprocess.run([sys.executable, str(ROOT / "build_engine.py"), "--checkpoint", str(tiny_ckpt), "--output",
                        str(out), "--tp-size", "2", "--config", str(ROOT / "configs/cpu-tiny.yaml")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "build engine" in r.stderr  # the progress bar
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["build"]["tp_size"] == 2 and cfg["format_version"] == FORMAT_VERSION
    assert set(cfg["files"]) >= {"rank0.safetensors", "rank1.safetensors", "tokenizer.json"}
    from safetensors import safe_open

    f = safe_open(str(out / "rank1.safetensors"), "pt")
    assert list(f.get_slice("layers.0.self_attn.qkv_proj.weight").get_shape()) == [(2 + 2 * 1) * 16, 64]
    assert list(f.get_slice("layers.1.feed_forward.experts.gate_up_proj").get_shape()) == [4, 32, 64]


def test_build_refuses_to_overwrite_foreign_dir(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    assert build_main(["--checkpoint", str(tiny_ckpt), "--output", str(tmp_path / "x"), "--no-progress",
                       "--config", str(ROOT / "configs/cpu-tiny.yaml")]) == 2
    assert "not an engine directory" in capsys.readouterr().err
    assert (tmp_path / "x" / "notes.txt").exists()


def test_fp8_from_bf16_checkpoint_is_refused(tiny_ckpt, tmp_path, capsys):
    rc = build_main(["--checkpoint", str(tiny_ckpt), "--output", str(tmp_path / "e"), "--no-progress",
                     "--config", str(ROOT / "configs/h200-tp8.yaml"), "--tp-size", "2"])
    assert rc == 2 and "run quantize.py first" in capsys.readouterr().err


def test_target_arch_is_checked_at_load(tmp_path):
    from maverick.config import BuildConfig, ConfigError

    with pytest.raises(ConfigError, match=r"target_arch='sm80': expected one of \['any', 'sm100', 'sm90'\]"):
        BuildConfig(target_arch="sm80")
    BuildConfig(target_arch="any").check_device((8, 0))
    BuildConfig(target_arch="sm90").check_device((9, 0))
    BuildConfig(target_arch="sm90").check_device(None)  # CPU
    with pytest.raises(ConfigError, match="built for target_arch=sm100, but the GPU is sm90"):
        BuildConfig(target_arch="sm100").check_device((9, 0))
    assert BuildConfig.from_dict({"target_arch": "sm_100"}).target_arch == "sm100"  # nvcc's spelling too


def test_target_arch_flag_is_recorded_in_the_engine(tiny_ckpt, tmp_path):
    from maverick.runtime.engine_loader import open_engine

    assert build_main(["--checkpoint", str(tiny_ckpt), "--output", str(tmp_path / "e"), "--no-progress",
                       "--target-arch", "sm_90"]) == 0
    assert open_engine(tmp_path / "e").build.target_arch == "sm90"


def test_kv_cache_max_tokens_sizes_the_pool(tiny_ckpt, tmp_path):
    from maverick import LLM
    from maverick.builder.builder import build_engine
    from maverick.config import BuildConfig, ConfigError

    with pytest.raises(ConfigError, match="kv_cache_max_tokens=4: expected an integer >= kv_cache_block_size=8"):
        BuildConfig(kv_cache_block_size=8, kv_cache_max_tokens=4)
    b = BuildConfig(dtype="float32", max_seq_len=256, max_batch_size=4, kv_cache_block_size=8, kv_cache_max_tokens=160)
    build_engine(tiny_ckpt, tmp_path / "e", b, progress=False)
    with LLM(tmp_path / "e", device="cpu") as llm:
        assert llm.kv_cache.global_pool.num_blocks == 20


def test_memory_plan_counts_the_eagle3_draft_split_by_vocabulary(tiny_ckpt, tmp_path, capsys):
    """NVIDIA's Maverick head at TP8: the layer whole (fc, attention, MLP: 0.86 GB bf16) and 1/8 of the
    202,048-row lm_head (0.26 GB instead of 2.07), plus its KV and feature caches; a dry run prints the line."""
    from test_eagle3 import write_eagle3

    from maverick.bench.spec import maverick_draft_config
    from maverick.builder.memory_plan import draft_bytes

    cfg = ModelConfig.preset("maverick")
    fp8 = BuildConfig.from_dict(load_build_yaml(ROOT / "configs/dgx-b200-tp8-min-latency.yaml")).for_model(cfg)
    dcfg = maverick_draft_config(cfg, 16384)
    g, _ = fp8.kv_pool_blocks(cfg)
    caches = (g + 1) * fp8.kv_cache_block_size * (2 * 8 * 128 + 5120) * 2
    split = draft_bytes(dcfg, fp8, g) - caches
    assert 1.10e9 < split < 1.14e9 and draft_bytes(dcfg, fp8.replace(tp_size=1), g) - caches > split + 1.8e9
    assert plan(cfg, fp8, dcfg).total == plan(cfg, fp8).total + draft_bytes(dcfg, fp8, g)
    assert build_main(["--checkpoint", str(tiny_ckpt), "--dry-run", "--speculative-model",
                       str(write_eagle3(tmp_path / "d")), "--max-draft-len", "3"]) == 0
    assert "eagle3 draft" in capsys.readouterr().out
