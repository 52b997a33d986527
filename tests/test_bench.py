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


def test_sweep_times_a_lone_prompt_from_its_prefill_graph(monkeypatch):
    """The sweep's prefill step is timed as the runtime runs it: a lone prompt up to the largest prefill graph
    from that graph (its padded size), other steps eagerly."""
    from maverick.bench import step as benchmark
    from maverick.config import BuildConfig

    calls = []
    monkeypatch.setattr(benchmark, "prefill_graph_ms", lambda r, n, t: calls.append(("graph", n, t)) or 1.0)
    monkeypatch.setattr(benchmark, "prefill_step_ms", lambda r, k, n: calls.append(("eager", k, n)) or 2.0)
    build = BuildConfig(max_num_tokens=4096, max_seq_len=9000)
    for prompts, n in ((1, 100), (1, 2048), (1, 2049), (2, 100)):
        benchmark._prefill_as_run(None, build, prompts, n)
    assert calls == [("graph", 100, 128), ("graph", 2048, 2048), ("eager", 1, 2049), ("eager", 2, 100)]


def test_parse_workloads_errors_name_the_item():
    assert parse_workloads("128/2048,1024/2048") == [(128, 2048), (1024, 2048)]
    with pytest.raises(ValueError, match="'128-2048'"):
        parse_workloads("128-2048")
    with pytest.raises(ValueError, match="positive"):
        parse_workloads("0/10")


def test_kv_blocks_cover_the_largest_plan():
    from maverick.bench.measure import kv_blocks
    from maverick.config import ModelConfig

    cfg = ModelConfig.preset("maverick")  # chunk 8192
    g, loc = kv_blocks(cfg, 64, [(1, 8193), (256, 1153)])
    assert g == max(129, 256 * 19) and loc == max(128, 256 * 19)


def test_bench_refuses_to_run_without_cuda(capsys):
    import torch

    from maverick.bench.cli import bench_main

    if torch.cuda.is_available():
        pytest.skip("this checks the no-GPU error path")
    assert bench_main(["step", "--batches", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert bench_main(["stepp"]) == 2 and "unknown subcommand 'stepp'" in capsys.readouterr().err
    assert bench_main(["--help"]) == 0 and "chain" in capsys.readouterr().out


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


def test_chain_benchmark_smoke(capsys):
    """maverick-bench chain end to end at toy shapes on CPU (kernels in the interpreter): every mode (PDL off
    and on switched in one process, cuBLAS's reference off CUDA) builds and runs the chain."""
    from maverick.bench.cli import bench_main

    assert bench_main(["chain", "--smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()  # ours, ours+pdl, cublas
    assert len(lines) == 3 and all("'finite': True" in line for line in lines), lines


def test_inflight_run_through_the_engine_loop():
    """The e2e benchmark drives the real engine (scheduler, chunked prefill, sampling) to completion:
    every request gets exactly OSL tokens, times are ordered, and the rates follow from them."""
    from maverick.bench.e2e import inflight_run
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig
    from maverick.runtime.model_runner import ModelRunner

    cfg = ModelConfig.preset("tiny")
    build = BuildConfig(max_seq_len=64, max_batch_size=3, kv_cache_block_size=16, quant=QuantConfig("FP8", None),
                        dtype="float32")
    runner = ModelRunner(synthetic_model(cfg, build, 0, "cpu"), 64, 3, 16)
    pt = inflight_run(runner, isl=20, osl=5, concurrency=3, max_num_tokens=32, tp_size=1, vocab=cfg.vocab_size)
    assert pt.steps >= 2 + 4  # 60 prompt tokens need 2 chunks of 32, then 4 more decode steps
    assert 0 < pt.mean_ttft_ms / 1e3 <= pt.mean_latency_s <= pt.wall_s
    assert pt.tokens_per_s_per_gpu == pytest.approx(3 * 5 / pt.wall_s)
    assert pt.tokens_per_s_per_user == pytest.approx(5 / pt.mean_latency_s)
    assert runner.kv.global_pool.num_free == runner.kv.global_pool.num_blocks  # every block back


def test_pareto_png_with_end_to_end_points(tmp_path):
    from maverick.bench.plot import main

    e2e = [dict(isl=128, osl=2048, concurrency=c, tokens_per_s_per_user=300 / c, tokens_per_s_per_gpu=40 * c)
           for c in (1, 4)]
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"header": "card=X command=y", "e2e": e2e}))
    assert main([str(src), str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
