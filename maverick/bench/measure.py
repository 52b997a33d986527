"""What maverick-bench measures, one function each: CUDA-event medians, HBM read bandwidth, a decode step
(with its floors, bench/floors.py) replayed from its CUDA graph, a prefill step, the all-reduce as the
layers run it, and the KV pool a set of runs needs. All timing: CUDA events, median, after warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick.config import ModelConfig
from maverick.runtime.step import StepSeq
from maverick.runtime.model_runner import ModelRunner

from .floors import step_work
from .timing import median_ms


def hbm_read_bandwidth(gib: float = 4.0) -> float:
    """Bytes/s of a large reduction (reads only), best of several graph replays."""
    x = torch.randn(int(gib * (1 << 30) // 2), dtype=torch.bfloat16, device="cuda").view(-1, 1 << 16)
    out = torch.empty(x.shape[0], dtype=torch.float32, device="cuda")
    g = torch.cuda.CUDAGraph()
    torch.sum(x, dim=1, dtype=torch.float32, out=out)
    with torch.cuda.graph(g):
        torch.sum(x, dim=1, dtype=torch.float32, out=out)
    ms = median_ms(g.replay, iters=20)
    del x
    return x_bytes(gib) / (ms / 1e3)


def x_bytes(gib: float) -> float:
    return int(gib * (1 << 30) // 2) * 2


@dataclass
class StepResult:
    batch: int
    context: int
    step_ms: float
    floor_ms: float  # the larger of the two floors (plus all-reduces where they run)
    bytes_per_step: float
    tokens_per_s_per_user: float
    tokens_per_s_per_gpu: float
    flops_per_step: float = 0.0
    bytes_floor_ms: float = 0.0
    flop_floor_ms: float = 0.0  # 0 where no FP8 peak was measured

    @property
    def ratio(self) -> float:
        return self.floor_ms / self.step_ms


def decode_step(runner: ModelRunner, cfg, build, batch: int, context: int, bandwidth: float,
                tp_size: int, peak_flops: float | None = None) -> StepResult:
    kv = runner.kv
    seqs = []
    for i in range(batch):
        blocks = kv.grow(10_000 + i, context + 1)
        seqs.append(StepSeq(10_000 + i, [i + 1], context, blocks))
    for k, v in runner.kv_caches:  # never time on zeros
        for t in (k, v):
            t.view(torch.uint8).random_(0, 120) if t.dtype == torch.float8_e4m3fn else t.normal_()
    runner.capture_cuda_graphs([batch])
    ms = median_ms(runner.stage_graph(seqs, batch).replay, iters=30)
    for s in seqs:
        kv.free(s.seq_id)
    runner.graphs = None
    work = step_work(runner.model, cfg, build, batch, 1, context)
    by, fl = work.floor_ms(bandwidth, peak_flops)
    return StepResult(batch, context, ms, max(by, fl), work.bytes, 1e3 / ms, batch * 1e3 / ms / tp_size,
                      work.flops, by, fl)


def prefill_step_ms(runner: ModelRunner, prompts: int, prompt_len: int) -> float:
    """One eager prefill step of `prompts` prompts of prompt_len tokens (CUDA events, median of 3 after a
    warm-up), in ms. With one prompt it is the time to first token."""
    gen = torch.Generator().manual_seed(prompt_len)  # the same prompts on every rank
    ids = [torch.randint(4, 200000, (prompt_len,), generator=gen).tolist() for _ in range(prompts)]

    def once():
        seqs = [StepSeq(20_000 + i, p, 0, runner.kv.grow(20_000 + i, prompt_len)) for i, p in enumerate(ids)]
        runner.forward(seqs)
        for i in range(prompts):
            runner.kv.free(20_000 + i)

    return median_ms(once, iters=3, warmup=1)


def time_to_first_token(runner: ModelRunner, prompt_len: int) -> float:
    return prefill_step_ms(runner, 1, prompt_len)


def prefill_graph_ms(runner: ModelRunner, prompt_len: int, graph_tokens: int) -> float:
    """One prompt of prompt_len tokens replayed from a prefill CUDA graph of graph_tokens tokens (the prompt
    padded up), in ms: CUDA events over replays, median. Captures that graph, drops it after."""
    gen = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(4, 200000, (prompt_len,), generator=gen).tolist()
    runner.capture_cuda_graphs([], [graph_tokens])
    seq = StepSeq(30_000, ids, 0, runner.kv.grow(30_000, prompt_len))
    ms = median_ms(runner.stage_graph([seq], (1, graph_tokens)).replay, iters=10)
    runner.kv.free(30_000)
    runner.graphs = None
    return ms


def allreduce_us(model, device: torch.device) -> float:
    """One all-reduce + add + RMSNorm of one token as the layers run it (fused one-shot over peer
    buffers, or NCCL + the add+norm kernel): median per call over graph replays of 2 x layers calls."""
    from maverick.layers import all_reduce_add_rms_norm

    H = model.cfg.hidden_size
    x = torch.randn(1, H, device=device, dtype=model.spec.dtype)
    d = torch.randn(1, H, device=device, dtype=model.spec.dtype)
    w = torch.ones(H, device=device, dtype=model.spec.dtype)
    n = 2 * model.cfg.num_hidden_layers

    def calls():
        for site in range(n):
            all_reduce_add_rms_norm(x, d, w, 1e-5, site)

    calls()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        calls()
    return median_ms(g.replay, iters=20) * 1e3 / n


def kv_blocks(cfg: ModelConfig, block_size: int, plans: list[tuple[int, int]]) -> tuple[int, int]:
    """Global and local KV blocks for the largest of the (batch, tokens per sequence) plans."""
    from maverick.runtime.kv_cache import cdiv

    g = max(b * cdiv(n, block_size) for b, n in plans)
    loc = max(b * cdiv(min(n, cfg.attention_chunk_size), block_size) for b, n in plans)
    return g, loc
