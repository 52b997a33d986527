#!/usr/bin/env python3
"""Per-kernel GPU time budget of one decode step (one rank of TP8 Maverick, random FP8 weights),
from torch.profiler over eager steps: where the step's time goes, summed by kernel name."""
import argparse
import sys
from collections import defaultdict

import torch


from maverick_plugins.dispatch import KernelOptions
from maverick.builder.synthetic import synthetic_model
from maverick.config import BuildConfig, ModelConfig, QuantConfig
from maverick.runtime.step import StepSeq
from maverick.runtime.model_runner import ModelRunner


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=1,
                   help="tokens each sequence runs, every one with its logits: K+1 is an EAGLE-3 verify step's shape")
    p.add_argument("--tp-size", type=int, default=8)
    p.add_argument("--reference", action="store_true", help="kernels off")
    p.add_argument("--ncu", action="store_true",
                   help="instead of torch.profiler: plain reads of --read-mb, then one step, between "
                        "cudaProfilerStart and Stop, for `ncu --profile-from-start off` (hardware counters per kernel)")
    p.add_argument("--read-mb", default="21,10.5", help="with --ncu: sizes of the plain reads to compare with (MB)")
    a = p.parse_args(argv)
    cfg = ModelConfig.preset("maverick")
    build = BuildConfig(tp_size=a.tp_size, max_batch_size=a.batch, max_seq_len=a.context + 64,
                        quant=QuantConfig("FP8", "FP8"), kv_cache_block_size=64)
    runner = ModelRunner(synthetic_model(cfg, build, 0, "cuda"), build.max_seq_len, a.batch, 64, device="cuda")
    q = a.new_tokens
    seqs = [StepSeq(i, [i + 1] * q, a.context, runner.kv.grow(i, a.context + q), num_logits=q) for i in range(a.batch)]
    runner.kernel_options = KernelOptions(enabled=not a.reference)
    for _ in range(3):
        runner.forward(seqs)
    torch.cuda.synchronize()
    if a.ncu:
        from maverick.bench.kernels import plain_read

        reads = [plain_read(int(float(mb) * 1e6))[0] for mb in a.read_mb.split(",") if mb]
        for read in reads:  # compiled outside the profiled range
            read()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        for read in reads:  # first, so that `ncu -c N` takes them and the step's first kernels
            read()
        runner.forward(seqs)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.forward(seqs)
        torch.cuda.synchronize()
    per_name, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name] += e.device_time_total / steps
            count[e.name] += 1
    total = sum(per_name.values())
    print(f"card={torch.cuda.get_device_name()} batch={a.batch} new_tokens={q} context={a.context} tp_size={a.tp_size} "
          f"kernels={'off' if a.reference else 'on'}: GPU time per step {total / 1e3:.3f} ms in "
          f"{sum(count.values()) // steps} kernels")
    print("| kernel | us per step | launches per step | share |")
    print("|---|---|---|---|")
    for name, us in sorted(per_name.items(), key=lambda kv: -kv[1])[:18]:
        print(f"| {name[:70]} | {us:.0f} | {count[name] // steps} | {us / total:.0%} |")


if __name__ == "__main__":
    sys.exit(main())
