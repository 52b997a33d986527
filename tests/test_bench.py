"""The benchmark's arithmetic and outputs that need no GPU: the sweep model, prefill packing, KV sizing,
argument errors and the Pareto PNG."""
import json

import pytest

from maverick.bench.sweep import SweepPoint, parse_workloads, prefill_ms


def test_sweep_point_arithmetic():
    p = SweepPoint(isl=128, osl=2048, concurrency=64, prefill_ms=100.0, step_ms=10.0, tp_size=8)
    assert p.total_s == pytest.approx((100 + 2048 * 10) / 1e3)
    assert p.tokens_per_s_per_user == pytest.approx(2048 / 20.58)
    assert p.tokens_per_s_per_gpu == pytest.approx(64 * 2048 / 20.58 / 8)
    assert "| 128/2048 | 64 |" in p.row()


def test_prefill_packs_prompts_into_max_num_tokens_steps():
    calls = []

    def step(n, L):
        calls.append((n, L))
        return float(n * L)  # 1 ms per token

    # 8192 tokens per step at ISL 1024: 8 prompts per step; 20 prompts = 2 full steps + one of 4
    assert prefill_ms(step, 20, 1024, 8192) == 2 * 8192 + 4 * 1024
    assert calls == [(8, 1024), (4, 1024)]  # equal steps timed once
    calls.clear()
    assert prefill_ms(step, 3, 10000, 8192) == 3 * 10000  # a prompt longer than a step: one per step
    assert calls == [(1, 10000)]


def test_parse_workloads_errors_name_the_item():
    assert parse_workloads("128/2048,1024/2048") == [(128, 2048), (1024, 2048)]
    with pytest.raises(ValueError, match="'128-2048'"):
        parse_workloads("128-2048")
    with pytest.raises(ValueError, match="positive"):
        parse_workloads("0/10")


def test_kv_blocks_cover_the_largest_plan():
    from maverick.benchmark import kv_blocks
    from maverick.config import ModelConfig

    cfg = ModelConfig.preset("maverick")  # chunk 8192
    g, loc = kv_blocks(cfg, 64, [(1, 8193), (256, 1153)])
    assert g == max(129, 256 * 19) and loc == max(128, 256 * 19)


def test_bench_refuses_to_run_without_cuda(capsys):
    import torch

    from maverick.benchmark import main

    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU error path")
    assert main(["--batches", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_pareto_png(tmp_path):
    from maverick.bench.plot import main

    pts = [SweepPoint(128, 2048, c, 50.0 * c, 5.0 + c / 10, 8) for c in (1, 4, 16)]
    results = {"header": "card=X gpus=1 command=y", "sweep": [
        dict(isl=p.isl, osl=p.osl, concurrency=p.concurrency, tokens_per_s_per_user=p.tokens_per_s_per_user,
             tokens_per_s_per_gpu=p.tokens_per_s_per_gpu) for p in pts]}
    src = tmp_path / "r.json"
    src.write_text(json.dumps(results))
    assert main([str(src), str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    src.write_text(json.dumps({"header": "h", "sweep": []}))
    assert main([str(src), str(tmp_path / "q.png")]) == 2


def test_chain_benchmark_smoke():
    """scripts/bench_chain.py end to end at toy shapes on CPU (kernels in the interpreter): every mode
    builds and runs the chain in its own process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_chain.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("'finite': True") == 3
