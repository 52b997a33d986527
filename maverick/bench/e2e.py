"""End-to-end concurrency runs through the real engine loop (scheduler, chunked prefill, in-flight
batching, decode steps replayed from CUDA graphs, sampling), not a model of it.

`concurrency` requests of ISL random token ids arrive at once, each asks for exactly OSL tokens
(greedy, EOS ignored); the engine runs until all are done. Per request: time to first token and
total time from arrival; over all requests the inter-token latency (the gaps between a request's
consecutive deliveries, p50 and p99: a decode row stalled behind a prompt chunk shows in the p99);
tokens/s per user = OSL / its total time (mean over requests); tokens/s per GPU = all generated tokens /
wall time / tp_size. In one-rank mode the all-reduces are not run.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass
class E2EPoint:
    isl: int
    osl: int
    concurrency: int
    wall_s: float
    mean_ttft_ms: float
    mean_latency_s: float
    steps: int
    tp_size: int
    floor_s: float = 0.0  # the run's work at the larger of its floors (bench/floors.py), 0 where not computed
    itl_p50_ms: float = 0.0  # inter-token latency: time between a request's consecutive deliveries
    itl_p99_ms: float = 0.0

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.osl / self.mean_latency_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.concurrency * self.osl / self.wall_s / self.tp_size

    def row(self) -> str:
        step = self.wall_s / self.steps * 1e3
        floor = self.floor_s / self.steps * 1e3
        return (f"| {self.isl}/{self.osl} | {self.concurrency} | {self.mean_ttft_ms:.1f} | {self.mean_latency_s:.2f} | "
                f"{self.itl_p50_ms:.2f} | {self.itl_p99_ms:.2f} | {self.steps} | {step:.3f} | {floor:.3f} | "
                f"{floor / step:.0%} | {self.tokens_per_s_per_user:.1f} | {self.tokens_per_s_per_gpu:.1f} |")


HEADER = ("| ISL/OSL | concurrency | mean TTFT ms | mean request s | ITL p50 ms | ITL p99 ms | engine steps | "
          "mean step ms | its floor ms | floor/step | tok/s/user | tok/s/GPU |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, nearest rank; 0 for none."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def run_floor_s(work_prefill, work_decode, osl: int, bandwidth: float, peak_flops: float | None) -> float:
    """A run's floor: its prompts' prefill (StepWork of all of them, weights read once: a lower bound) and
    OSL - 1 decode steps at the mean context, each at the larger of its bytes and FLOP floors."""
    pre = max(work_prefill.floor_ms(bandwidth, peak_flops))
    dec = max(work_decode.floor_ms(bandwidth, peak_flops))
    return (pre + (osl - 1) * dec) / 1e3


def inflight_run(runner, isl: int, osl: int, concurrency: int, max_num_tokens: int, tp_size: int,
                 vocab: int, before_step=None, overlap: bool = True) -> E2EPoint:
    """before_step(plan, rows): with several ranks, rank 0 sends each step to the others (as LLM does).
    overlap: the engine's overlap scheduler (queue the next decode step before reading this one's tokens)."""
    from maverick.runtime.engine import EngineCore
    from maverick.runtime.sampling_params import SamplingParams

    cuda = runner.device.type == "cuda"
    engine = EngineCore(runner, None, max_batch_size=concurrency, max_num_tokens=max_num_tokens,
                        before_step=before_step, overlap=overlap)
    gen = torch.Generator().manual_seed(1000 * isl + concurrency)
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reqs = [engine.add_request(torch.randint(4, vocab, (isl,), generator=gen).tolist(), params)
            for _ in range(concurrency)]
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    last: dict[int, tuple[float, int]] = {}  # request -> (time, tokens) of its latest delivery
    gaps: list[float] = []
    while engine.has_unfinished():
        for r in engine.step():  # each step ends in a host copy of the sampled tokens: times are real
            now = time.perf_counter()
            n = len(r.output_token_ids)
            if n and r.request_id not in first:
                first[r.request_id] = now
            prev = last.get(r.request_id)
            if prev is not None and n > prev[1]:
                gaps.append(now - prev[0])
            if n and (prev is None or n > prev[1]):
                last[r.request_id] = (now, n)
            if r.finished:
                done[r.request_id] = now
    wall = time.perf_counter() - t0
    bad = [r.request_id for r in reqs if len(r.output_token_ids) != osl]
    if bad:
        raise RuntimeError(f"requests {bad} did not produce exactly {osl} tokens")
    return E2EPoint(isl, osl, concurrency, wall,
                    1e3 * sum(first[r.request_id] - t0 for r in reqs) / concurrency,
                    sum(done[r.request_id] - t0 for r in reqs) / concurrency, engine.steps, tp_size,
                    itl_p50_ms=1e3 * percentile(gaps, 0.5), itl_p99_ms=1e3 * percentile(gaps, 0.99))
