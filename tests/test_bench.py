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
    assert 0 < pt.itl_p50_ms <= pt.itl_p99_ms <= 1e3 * pt.wall_s
    assert runner.kv.global_pool.num_free == runner.kv.global_pool.num_blocks  # every block back


def test_pareto_png_with_end_to_end_points(tmp_path):
    from maverick.bench.plot import main

    e2e = [dict(isl=128, osl=2048, concurrency=c, tokens_per_s_per_user=300 / c, tokens_per_s_per_gpu=40 * c)
           for c in (1, 4)]
    src = tmp_path / "r.json"
    src.write_text(json.dumps({"header": "card=X command=y", "e2e": e2e}))
    assert main([str(src), str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000


def _meta_model(preset: str, **build):
    import torch

    from maverick.builder.spec import model_spec
    from maverick.config import BuildConfig, ModelConfig
    from maverick.models import Llama4ForCausalLM

    cfg = ModelConfig.preset(preset)
    b = BuildConfig(**build).for_model(cfg)
    with torch.device("meta"):
        return Llama4ForCausalLM(cfg, model_spec(b, 0)), cfg, b


def test_step_floors_scale_as_the_work_does():
    """FLOPs grow with every token (top_k experts each, lm_head per logits row); bytes read the routed experts
    only as far as the tokens select them, so they saturate; FP8 halves the linears' bytes, not their FLOPs."""
    from maverick.bench.floors import step_work
    from maverick.config import QuantConfig

    model, cfg, b = _meta_model("maverick", tp_size=8, quant=QuantConfig("FP8", "FP8"), kv_cache_block_size=64)
    one, eight = step_work(model, cfg, b, 1, 1, 1024), step_work(model, cfg, b, 8, 1, 1024)
    assert abs(eight.flops - 8 * one.flops) < 1e-9 * eight.flops  # decode: linear in the batch
    huge = step_work(model, cfg, b, 4096, 1, 0)
    experts = sum(t.numel() for n, t in model.state_dict().items() if ".experts." in n and not n.endswith("scale"))
    dense = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                if ".experts." not in n and n != "embed_tokens.weight")
    # batch 1: one expert of 128 per MoE layer; batch 4096: all of them (FP8: one byte a weight)
    assert one.bytes < dense + experts / 100 + 1024 * 2e6 and huge.bytes > dense + 0.999 * experts
    # the one-rank TP8 step at 1K context reads about 2.4 GB (its in-run floor: 0.503 ms at 4.8 TB/s)
    assert 2.0e9 < one.bytes < 2.8e9
    by, fl = one.floor_ms(4.8e12, 1.3e15)
    assert by > 10 * fl  # batch 1 is bandwidth-bound
    by, fl = huge.floor_ms(4.8e12, 1.3e15)
    assert fl > by  # batch 4096 is compute-bound
    bf16, _, bb = _meta_model("maverick", tp_size=8, kv_cache_block_size=64)
    hi = step_work(bf16, cfg, bb, 1, 1, 1024)
    assert abs(hi.flops - one.flops) < 1e-6 * one.flops and hi.bytes > 1.7 * (one.bytes - 1024 * 2e5)


def test_prefill_floor_computes_logits_once_and_attention_causally():
    from maverick.bench.floors import step_work

    model, cfg, b = _meta_model("tiny")
    lm = next(t.numel() for n, t in model.state_dict().items() if n == "lm_head.weight")
    pre = step_work(model, cfg, b, 1, 16, 0)
    every = step_work(model, cfg, b, 1, 16, 0, logits_rows=16)
    assert every.flops - pre.flops == 2 * lm * 15
    pair = 4 * cfg.local_heads(1) * cfg.head_dim
    longer = step_work(model, cfg, b, 1, 16, 8)  # 8 more keys for every query, in the global and local layers
    keys = min(8 + 8.5, cfg.attention_chunk_size) - min(8.5, cfg.attention_chunk_size)
    assert longer.flops - pre.flops == 16 * pair * (len(cfg.nope_layer_ids) * 8 + len(cfg.rope_layer_ids) * keys)


def test_e2e_run_floor_is_its_prefill_and_decode_floors():
    from maverick.bench.e2e import E2EPoint, run_floor_s
    from maverick.bench.floors import StepWork

    pre, dec = StepWork(bytes=1e9, flops=3e12), StepWork(bytes=2e9, flops=1e12)  # 3 ms FLOP-, 2 ms bytes-bound
    floor = run_floor_s(pre, dec, osl=11, bandwidth=1e12, peak_flops=1e15)
    assert floor == pytest.approx((3 + 10 * 2) / 1e3)
    pt = E2EPoint(128, 11, 1, wall_s=2 * floor, mean_ttft_ms=5, mean_latency_s=2 * floor, steps=12, tp_size=1,
                  floor_s=floor)
    assert "| 12 | 3.833 | 1.917 | 50% |" in pt.row()


def test_percentile_is_nearest_rank():
    from maverick.bench.e2e import percentile

    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50 and percentile(values, 0.99) == 99 and percentile(values, 1.0) == 100
    assert percentile([3.0], 0.99) == 3 and percentile([], 0.5) == 0


def test_round_inputs_host_time_runs_without_a_gpu():
    """maverick-bench host-batch stages a steady round's inputs as the round graph does, on the CPU."""
    from maverick.bench.host_batch import round_inputs_ms

    assert 0 < round_inputs_ms(3, 2, 3) < 1e3


def test_compiles_names_what_the_warm_up_missed():
    """maverick-bench compiles lists, for a kernel compiled while serving, the argument specializations and
    constexprs its load-time specializations never had (from Triton's own specialization string)."""
    from maverick.bench.compiles import new_specializations, prompt_sizes

    load = ["_decode_kernel[num_warps=4](q_ptr: ('*bf16', 'D'), Q: ('i32', ''), NUM_SPLITS: ('constexpr', 8))"]
    serving = ["_decode_kernel[num_warps=4](q_ptr: ('*bf16', 'D'), Q: ('i32', 'D'), NUM_SPLITS: ('constexpr', 8))",
               "_decode_kernel[num_warps=4](q_ptr: ('*bf16', 'D'), Q: ('i32', 'D'), NUM_SPLITS: ('constexpr', 3))",
               "_merge_kernel[num_warps=4](m_buf: ('*fp32', 'D'))"]
    assert new_specializations(load, serving) == [
        "_decode_kernel: Q=('i32', 'D')", "_decode_kernel: Q=('i32', 'D'), NUM_SPLITS=('constexpr', 3)",
        "_merge_kernel: m_buf=('*fp32', 'D')"]
    # every value seen, not together: the arguments that differ from the closest specialization
    load = ["_k[](a: ('*i64', 'D'), b: ('*i64', ''))", "_k[](a: ('*i64', ''), b: ('*i64', 'D'))"]
    assert new_specializations(load, ["_k[](a: ('*i64', ''), b: ('*i64', ''))"]) == [
        "_k: a new combination: a=('*i64', '') (was ('*i64', 'D'))"]
    # launch options count as arguments: the same signature at another num_warps is a compile too
    load = ["_k[num_warps=4, num_stages=3](a: ('*i64', 'D'))", "_k[num_warps=8, num_stages=2](a: ('*i64', 'D'))"]
    assert new_specializations(load, ["_k[num_warps=8, num_stages=3](a: ('*i64', 'D'))"]) == [
        "_k: a new combination: [num_warps]=8 (was 4)"]
    assert prompt_sizes(64) == [*range(1, 18), 31, 32, 33, 63, 64]


def test_compiles_describes_a_specialization_from_the_compile_arguments():
    from maverick.bench.compiles import describe, new_specializations

    # shaped like Triton's jit_cache_hook compile argument: parameter 2 specialized to a constexpr,
    # parameter 0 known 16-divisible, the launch options at the end of the cache key
    def compile(warps, div=True, block=64):
        return {"signature": {"x": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                "constants": {(2,): block}, "configs": [{(0,): [["tt.divisibility", 16]]} if div else {}],
                "num_warps": warps, "num_stages": 3,
                "key": f"[('*bf16', 'D'), ('i32', ''), ('constexpr', {block})]{{'num_warps': {warps}, 'launch_pdl': True}}"}

    d = describe("_k", ["x", "n", "BLOCK"], compile(4))
    assert d == "_k[launch_pdl=True, num_warps=4](x: (*bf16, tt.divisibility=16), n: (i32, -), BLOCK: (constexpr, 64))"
    load = [d, describe("_k", ["x", "n", "BLOCK"], compile(8, div=False))]
    assert new_specializations(load, [describe("_k", ["x", "n", "BLOCK"], compile(8))]) == [
        "_k: a new combination: [num_warps]=8 (was 4)"]
    assert new_specializations(load, [describe("_k", ["x", "n", "BLOCK"], compile(4, block=32))]) == [
        "_k: BLOCK=(constexpr, 32)"]


def test_spec_acceptance_at_other_draft_lengths_follows_the_chain_model(capsys):
    from maverick.bench.spec import acceptance_at, chain_rate, main

    a = chain_rate(2.94, 3)
    assert abs(1 + a + a * a + a ** 3 - 2.94) < 1e-9
    assert acceptance_at(2.94, 3, 3) == pytest.approx(2.94)
    # a shorter chain accepts fewer tokens than the K=3 figure (not the K=3 figure capped at K+1)
    assert acceptance_at(2.94, 3, 2) == pytest.approx(1 + a + a * a) and acceptance_at(2.94, 3, 2) < 2.5
    assert acceptance_at(2.94, 3, 1) == pytest.approx(1 + a)
    assert acceptance_at(4.0, 3, 5) == pytest.approx(6.0)  # every draft accepted stays so
    assert acceptance_at(1.0, 3, 5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"K=3 lies in \[1, 4\], got 4.5"):
        chain_rate(4.5, 3)
    assert main(["--acceptance", "2.9,4.5"]) == 2
    assert "error: --acceptance: an acceptance length at K=3 lies in [1, 4], got 4.5" in capsys.readouterr().err


def test_table_overrides_set_a_threshold_for_the_run(monkeypatch, capsys):
    """maverick-bench --table FIELD=VALUE (before the subcommand) sets that threshold in every device's
    dispatch table for the run, and names what it set; unknown fields and values that are not integers are
    refused, naming the valid fields."""
    import torch

    from maverick.bench.cli import bench_main
    from maverick_plugins import dispatch

    monkeypatch.setattr(dispatch, "TABLES", dict(dispatch.TABLES))
    monkeypatch.setattr(dispatch, "DEFAULT", dispatch.DEFAULT)
    assert dispatch.table(torch.device("cpu")).moe_block_max_tokens == 1
    assert bench_main(["--table", "moe_block_max_tokens=4", "--table", "gemv_max_tokens=3"]) == 2  # no subcommand
    out = capsys.readouterr().out
    assert "dispatch table overrides: moe_block_max_tokens=4, gemv_max_tokens=3" in out and "usage:" in out
    assert dispatch.table(torch.device("cpu")).moe_block_max_tokens == 4
    assert all(t.moe_block_max_tokens == 4 and t.gemv_max_tokens == 3 for t in dispatch.TABLES.values())
    assert bench_main(["--table", "moe_block=4", "host-batch"]) == 2
    assert "expected FIELD=VALUE with FIELD one of [" in capsys.readouterr().err
    with pytest.raises(ValueError, match="expected an integer value"):
        dispatch.override_tables(["gemm_max_tokens=many"])
    with pytest.raises(ValueError, match="'name=x': expected FIELD=VALUE"):
        dispatch.override_tables(["name=x"])  # not a threshold
