"""maverick-bench / scripts/bench.py: full-size Maverick on the GPUs we have.

One-rank mode (the default): rank 0 of TP=N does its full per-rank work (all 48 layers at per-rank
shapes, random FP8 weights made on the GPU) on one GPU; the all-reduces are not run, their cost is
reported apart from a latency given with --allreduce-us (measured on a multi-GPU machine). Every
figure is timed with CUDA events over CUDA-graph replays (median), next to the roofline measured in
the same run: HBM read bandwidth, the bytes the step must read, floor = bytes / bandwidth.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from maverick.build.memory_plan import kv_bytes_per_token
from maverick.build.synthetic import synthetic_model
from maverick.config import BuildConfig, ModelConfig, QuantConfig
from maverick.runtime.batch import StepSeq
from maverick.runtime.model_runner import ModelRunner


def median_ms(fn, iters: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


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
    floor_ms: float
    bytes_per_step: float
    tokens_per_s_per_user: float
    tokens_per_s_per_gpu: float

    @property
    def ratio(self) -> float:
        return self.floor_ms / self.step_ms


def step_bytes(model, cfg: ModelConfig, build: BuildConfig, batch: int, context: int) -> float:
    """Bytes one rank must read for a decode step: every weight once, but routed experts only as many
    as the batch can select (expected distinct experts under uniform routing), plus the KV read."""
    total = 0
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        if ".experts." in name:
            e_local = t.shape[0] if t.dim() >= 2 else 1
            picks = batch * cfg.num_experts_per_tok
            e_all = cfg.num_local_experts
            used = e_all * (1 - (1 - 1 / e_all) ** picks) * e_local / e_all  # expected distinct local experts
            n = n * used / e_local
        elif name == "embed_tokens.weight":
            n = batch * t.shape[1] * t.element_size()
        total += n
    g, loc = kv_bytes_per_token(cfg, build)  # summed over layers of each kind
    return total + batch * (g * context + loc * min(context, cfg.attention_chunk_size))


def decode_step(runner: ModelRunner, cfg, build, batch: int, context: int, bandwidth: float,
                tp_size: int) -> StepResult:
    kv = runner.kv
    seqs = []
    for i in range(batch):
        blocks = kv.grow(10_000 + i, context + 1)
        seqs.append(StepSeq(10_000 + i, [i + 1], context, blocks))
    for k, v in runner.kv_caches:  # never time on zeros
        for t in (k, v):
            t.view(torch.uint8).random_(0, 120) if t.dtype == torch.float8_e4m3fn else t.normal_()
    runner.capture_cuda_graphs([batch])
    graph, static, _ = runner.graphs.graphs[batch]
    batch_t = runner._padded(seqs, batch).to(runner.device)
    for f in static.__dataclass_fields__:
        getattr(static, f).copy_(getattr(batch_t, f))
    ms = median_ms(graph.replay, iters=30)
    for s in seqs:
        kv.free(s.seq_id)
    runner.graphs = None
    nbytes = step_bytes(runner.model, cfg, build, batch, context)
    floor = nbytes / bandwidth * 1e3
    return StepResult(batch, context, ms, floor, nbytes, 1e3 / ms, batch * 1e3 / ms / tp_size)


def time_to_first_token(runner: ModelRunner, prompt_len: int) -> float:
    """Eager prefill of one prompt (CUDA events, median of 3 after a warm-up), in ms."""
    ids = torch.randint(4, 200000, (prompt_len,)).tolist()

    def once():
        blocks = runner.kv.grow(20_000, prompt_len)
        runner.forward([StepSeq(20_000, ids, 0, blocks)])
        runner.kv.free(20_000)

    return median_ms(once, iters=3, warmup=1)


def git_commit() -> str:
    from maverick import envs

    if envs.commit_override():
        return envs.commit_override()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maverick-bench", description=__doc__)
    p.add_argument("--preset", default="maverick")
    p.add_argument("--tp-size", type=int, default=8, help="per-rank shapes of this TP size (one-rank mode)")
    p.add_argument("--batches", default="1,4,8,16", help="decode batch sizes")
    p.add_argument("--contexts", default="1024,8192")
    p.add_argument("--kv-cache-dtype", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--reference", action="store_true", help="also time batch 1 with the kernels off")
    p.add_argument("--ttft", default="", help="prompt lengths for time to first token, e.g. 1024,8192")
    p.add_argument("--allreduce-us", type=float, help="one all-reduce's latency, measured elsewhere")
    p.add_argument("--json", help="write results here")
    p.add_argument("--pdl", action="store_true", help="launch kernels with programmatic dependent launch")
    a = p.parse_args(argv)
    import maverick_plugins.dispatch as dispatch

    dispatch.set_pdl(a.pdl)  # before any kernel module is imported: they bind the flag at import
    if not torch.cuda.is_available():
        print("error: maverick-bench needs a CUDA GPU", file=sys.stderr)
        return 2
    import maverick_plugins as ops

    cfg = ModelConfig.preset(a.preset)
    batches = [int(x) for x in a.batches.split(",")]
    contexts = [int(x) for x in a.contexts.split(",")]
    longest = max(contexts + [int(x) for x in a.ttft.split(",") if x])
    build = BuildConfig(tp_size=a.tp_size, max_batch_size=max(batches), max_seq_len=longest + 64,
                        quant=QuantConfig("FP8", "FP8" if a.kv_cache_dtype == "fp8" else None),
                        kv_cache_block_size=64)
    card = torch.cuda.get_device_name()
    head = (f"card={card} gpus=1 mode=one-rank tp_size={a.tp_size} preset={a.preset} pdl={a.pdl} "
            f"commit={git_commit()} "
            f"command={' '.join(sys.argv)}")
    print(head, flush=True)
    bw = hbm_read_bandwidth()
    print(f"HBM read bandwidth (4 GiB reduction, graph replay, median): {bw / 1e12:.2f} TB/s", flush=True)
    t0 = time.time()
    model = synthetic_model(cfg, build, 0, "cuda")
    torch.cuda.synchronize()
    wbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"synthetic rank-0 weights: {wbytes / 1e9:.2f} GB in {time.time() - t0:.1f} s", flush=True)
    runner = ModelRunner(model, max_seq_len=build.max_seq_len, max_batch_size=max(batches),
                         block_size=build.kv_cache_block_size, device="cuda")
    rows = []
    n_ar = 2 * cfg.num_hidden_layers
    for ctx in contexts:
        for b in batches:
            r = decode_step(runner, cfg, build, b, ctx, bw, a.tp_size)
            rows.append(("kernels", r))
            print(f"  decode b={b} ctx={ctx}: {r.step_ms:.3f} ms/step, floor {r.floor_ms:.3f} ms "
                  f"({r.bytes_per_step / 1e9:.3f} GB), {r.ratio:.0%} of roofline", flush=True)
    for n in [int(x) for x in a.ttft.split(",") if x]:
        print(f"  time to first token, {n}-token prompt (eager prefill, one rank): {time_to_first_token(runner, n):.1f} ms",
              flush=True)
    if a.reference:
        ops.set_kernels_enabled(False)
        r = decode_step(runner, cfg, build, 1, contexts[0], bw, a.tp_size)
        ops.set_kernels_enabled(True)
        rows.append(("reference", r))
    print("\n| path | batch | context | step ms | floor ms | floor/step | tok/s/user | tok/s/GPU (TP) |")
    print("|---|---|---|---|---|---|---|---|")
    for path, r in rows:
        print(f"| {path} | {r.batch} | {r.context} | {r.step_ms:.3f} | {r.floor_ms:.3f} | {r.ratio:.0%} | "
              f"{r.tokens_per_s_per_user:.0f} | {r.tokens_per_s_per_gpu:.0f} |")
    if a.allreduce_us:
        ar_ms = n_ar * a.allreduce_us / 1e3
        print(f"all-reduces not run in one-rank mode: {n_ar} x {a.allreduce_us} us = {ar_ms:.3f} ms per step")
    b200_bw = 8e12
    one = next(r for p_, r in rows if p_ == "kernels" and r.batch == 1)
    print(f"PROJECTION (not measured) DGX B200 TP8 batch 1 ctx {one.context}: floor "
          f"{one.bytes_per_step / b200_bw * 1e3:.3f} ms/step at 8 TB/s + {n_ar} all-reduces")
    if a.json:
        Path(a.json).write_text(json.dumps({"header": head, "bandwidth_Bps": bw,
                                            "rows": [dict(path=p_, **asdict(r)) for p_, r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
