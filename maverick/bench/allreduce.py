#!/usr/bin/env python3
"""All-reduce (+ residual add + RMSNorm) latency inside CUDA graphs on every GPU of this host.

Rows: NCCL all-reduce alone; NCCL + our add+RMSNorm kernel (the fallback path); PyTorch's symmetric
memory one-shot all-reduce alone (multicast off); our fused one-shot all-reduce + add + RMSNorm over
peer buffers. bf16 x hidden 5120 = 10 KB per token; 1 and 8 tokens. Each figure: median over 30
replays of a graph of 48 back-to-back calls (what one decode step's layers do), per call.
Run: `torchrun --nproc_per_node=N -m maverick.bench.allreduce`; rank 0 prints.
"""
import sys

import torch
import torch.distributed as dist

import maverick_plugins as ops
from maverick.bench.timing import git_commit, median_ms

REPS = 48  # calls per graph


def graph_us(fn, iters=30):
    """REPS calls captured in one graph, every rank starting each replay together; median us a call."""
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(REPS):
            fn(i)
    return median_ms(g.replay, iters=iters, warmup=1, before=dist.barrier) * 1e3 / REPS


def main(argv: list[str] | None = None) -> int:
    from maverick import envs

    if envs.torchrun_world() is None:
        print("error: run under torchrun: torchrun --nproc_per_node=N -m maverick.bench.allreduce", file=sys.stderr)
        return 2
    rank, world, _ = envs.torchrun_world()
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", device_id=dev)
    group = dist.group.WORLD.group_name
    hidden, eps = 5120, 1e-5
    ws = ops.PeerWorkspace(group, REPS, 16, hidden, torch.bfloat16, dev)
    w = torch.randn(hidden, device=dev, dtype=torch.bfloat16)
    rows = []
    for tokens in (1, 8):
        x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
        d = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16) / world
        rows.append((tokens, "NCCL all_reduce", graph_us(lambda i: dist.all_reduce(d))))
        rows.append((tokens, "NCCL all_reduce + add_rms_norm kernel",
                     graph_us(lambda i: ops.add_rms_norm(x, dist.all_reduce(d) or d, w, eps))))
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(tokens, hidden, device=dev, dtype=torch.bfloat16)
            symm_mem.rendezvous(buf, group)
            buf.copy_(d)
            rows.append((tokens, "torch symm-mem one_shot_all_reduce (alone)", graph_us(
                lambda i: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group))))
        except Exception as e:  # report, keep the others
            rows.append((tokens, f"torch symm-mem unavailable: {type(e).__name__}: {str(e)[:60]}", float("nan")))
        rows.append((tokens, "maverick fused one-shot all_reduce + add + RMSNorm",
                     graph_us(lambda i: ws.allreduce_add_rms_norm(x, d, w, eps, i))))
    if rank == 0:
        print(f"card={torch.cuda.get_device_name()} gpus={world} commit={git_commit()} "
              f"dtype=bf16 hidden={hidden} CUDA graph of {REPS} calls, median of 30 replays, per call")
        print("| tokens | path | us per call |")
        print("|---|---|---|")
        for tokens, name, us in rows:
            print(f"| {tokens} | {name} | {us:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
