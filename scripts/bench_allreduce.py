#!/usr/bin/env python3
"""One-token all-reduce latency (bf16 x hidden 5120 = 10 KB) inside CUDA graphs, on every GPU of this
host: NCCL, and PyTorch symmetric-memory one-shot (multicast off). Run with
`torchrun --nproc_per_node=N scripts/bench_allreduce.py`; rank 0 prints the table."""
import os
import statistics

import torch
import torch.distributed as dist


def graph_us(fn, reps=50, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(iters):
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(ts)


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device(f"cuda:{rank}"))
    x = torch.randn(1, 5120, device="cuda", dtype=torch.bfloat16)
    rows = [("NCCL all_reduce", graph_us(lambda: dist.all_reduce(x)))]
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(1, 5120, device="cuda", dtype=torch.bfloat16)
        symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
        buf.copy_(x)
        rows.append(("symm-mem one_shot_all_reduce", graph_us(
            lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", dist.group.WORLD.group_name))))
    except Exception as e:  # report, keep the NCCL figure
        rows.append((f"symm-mem unavailable: {type(e).__name__}: {str(e)[:80]}", float("nan")))
    if rank == 0:
        print(f"card={torch.cuda.get_device_name()} gpus={world} message=10 KB (1 x 5120 bf16), CUDA graph, median")
        for name, us in rows:
            print(f"| {name} | {us:.1f} us |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
