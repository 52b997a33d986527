#!/usr/bin/env python3
"""Where an engine step's time goes beyond its CUDA-graph replay (one GPU, one-rank TP8 shapes).

Runs the real engine loop (EngineCore: scheduler, ForwardBatch, graph replay, sampling, stop checks)
on the full-size synthetic model and prints, per decode step at each concurrency: the wall time of a
step, the graph replay alone (CUDA events, median), and the host phases (schedule, forward call,
sampling up to the token copy, bookkeeping), plus the top host ops of a short torch.profiler trace.
Usage: maverick-bench profile-engine [--concurrency 1,16] [--steps 200]
"""
import argparse
import statistics
import sys
import time


import torch

from maverick.bench.measure import kv_blocks
from maverick.bench.timing import git_commit, median_ms
from maverick.builder.synthetic import synthetic_model
from maverick.config import BuildConfig, ModelConfig, QuantConfig
from maverick.runtime.engine import EngineCore
from maverick.runtime.model_runner import ModelRunner
from maverick.runtime.sampling_params import SamplingParams


class Phases:
    """Wraps bound methods with perf_counter timers (host time; the sampling phase also waits for the GPU)."""

    def __init__(self):
        self.t: dict[str, list[float]] = {}

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t.setdefault(label, []).append(time.perf_counter() - t0)
        setattr(obj, name, timed)


def run(runner, vocab, concurrency, isl, steps, temperature, profile, overlap):
    kw = {} if overlap is None else dict(overlap=overlap)  # the baseline commit has no overlap scheduler
    engine = EngineCore(runner, None, max_batch_size=concurrency, max_num_tokens=8192, **kw)
    params = SamplingParams(max_tokens=steps + 8, temperature=temperature, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(concurrency):
        engine.add_request(torch.randint(4, vocab, (isl,), generator=gen).tolist(), params)
    engine.step()  # prefill (eager), not profiled
    ph = Phases()
    ph.wrap(engine.scheduler, "schedule", "schedule")
    if hasattr(engine, "_read"):
        ph.wrap(engine.runner, "step", "forward + sampler call")
        ph.wrap(engine, "_read", "token read + bookkeeping")
    elif hasattr(engine, "_emit"):
        ph.wrap(engine.runner, "step", "forward + sampler call")
        ph.wrap(engine, "_emit", "token copy + bookkeeping")
    else:  # before 2026-11-26's one-copy inputs and sampler graphs
        ph.wrap(engine.runner, "forward", "forward call")
        ph.wrap(engine, "_sample", "sample + token copy")
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t0)
    trace = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            for _ in range(10):
                engine.step()
        trace = p.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    for r in list(engine.requests.values()):
        engine.abort(r.request_id)
    return walls, ph.t, trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--isl", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--overlap", choices=["on", "off"], help="the overlap scheduler (default: the engine's)")
    p.add_argument("--lm-head-fp8", action="store_true", help="lm_head_quant_algo FP8_PER_CHANNEL_PER_TOKEN")
    a = p.parse_args(argv)
    cfg = ModelConfig.preset("maverick")
    conc = [int(x) for x in a.concurrency.split(",")]
    n = a.isl + a.steps + 32
    build = BuildConfig(tp_size=8, max_batch_size=max(conc), max_seq_len=n + 64,
                        quant=QuantConfig("FP8", "FP8"), kv_cache_block_size=64,
                        lm_head_quant_algo="FP8_PER_CHANNEL_PER_TOKEN" if a.lm_head_fp8 else None)
    dev = torch.device("cuda")
    print(f"card={torch.cuda.get_device_name()} commit={git_commit()} command={' '.join(sys.argv)}", flush=True)
    model = synthetic_model(cfg, build, 0, dev)
    g, loc = kv_blocks(cfg, 64, [(c, n) for c in conc])
    runner = ModelRunner(model, max_seq_len=build.max_seq_len, max_batch_size=max(conc), block_size=64,
                         device=dev, num_global_blocks=g, num_local_blocks=loc)
    runner.capture_cuda_graphs(sorted({1, 2, 4, 8, 16, 32, 64} | set(conc)))
    for c in conc:
        overlap = None if a.overlap is None else a.overlap == "on"
        walls, phases, trace = run(runner, cfg.vocab_size, c, a.isl, a.steps, a.temperature, a.profile, overlap)
        graph = runner.graphs.graphs[runner.graphs.shape_for([1] * c, [1] * c)].forward
        replay_ms = median_ms(graph.replay, iters=50)
        med = statistics.median
        print(f"\nconcurrency {c}, context {a.isl}+, temperature {a.temperature}, overlap {a.overlap}: step wall {1e3 * med(walls):.3f} ms "
              f"(median of {len(walls)}), graph replay alone {replay_ms:.3f} ms", flush=True)
        for k, v in phases.items():
            print(f"  {k:<22} {1e3 * med(v):.3f} ms", flush=True)
        if trace:
            print(trace, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
