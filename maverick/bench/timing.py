"""The one way benchmarks time GPU work: CUDA events around each call, median of many, after warm-up
(captured work is timed by replaying its graph). Also the commit a result is reported against."""
from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

import torch


def median_ms(fn, iters: int = 30, warmup: int = 3, before=None) -> float:
    """Median milliseconds of fn() over `iters` timed calls. before(): run untimed ahead of each call
    (e.g. a barrier, so every rank starts together)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before is not None:
            before()
            torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_us(fns, reps: int = 20, iters: int = 50) -> float:
    """`reps` calls (rotating over fns, e.g. over weight copies that do not fit L2 together) captured in one
    CUDA graph; median microseconds a call."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fns[i % len(fns)]()
    return median_ms(g.replay, iters=iters, warmup=1) * 1e3 / reps


def git_commit() -> str:
    """The short commit of the tree benchmarked (MAVERICK_COMMIT where the tree has no .git)."""
    from maverick import envs

    if envs.commit_override():
        return envs.commit_override()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
