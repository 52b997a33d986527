#!/usr/bin/env python3
"""Does a TP group with the fused all-reduce's peer buffers shut down? (It hung at TP2 and TP4 on
H200, benchmarks/HISTORY.md.) Each rank maps a PeerWorkspace, runs fused calls, then shuts down in the way
--order names; a rank still inside after 30 s prints every thread's Python stack and exits 3.
Run: `torchrun --nproc_per_node=2 -m maverick.bench.check_peer_shutdown --order runtime`.
Orders: runtime (maverick.distributed.shutdown as is), free-first (drop the workspace, collect,
synchronize, barrier, then destroy), no-destroy (barrier, then leave the group to process exit).
"""
import argparse
import faulthandler
import gc
import sys
import time

import torch
import torch.distributed as dist

from maverick import distributed, envs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--order", choices=["runtime", "free-first", "no-destroy"], default="runtime")
    a = p.parse_args(argv)
    rank, world, local = envs.torchrun_world()
    dev = torch.device("cuda", local)
    torch.cuda.set_device(dev)
    distributed.init(rank, world, "nccl", "env://")
    assert distributed.enable_peer_all_reduce(4, 16, 5120, torch.bfloat16, dev, force=True)
    ws = distributed.peer_workspace()
    x = torch.randn(2, 5120, device=dev, dtype=torch.bfloat16)
    w = torch.ones(5120, device=dev, dtype=torch.bfloat16)
    for i in range(40):
        x, _ = ws.allreduce_add_rms_norm(x, x, w, 1e-5, i % 4)
    torch.cuda.synchronize()
    ws.check()
    del ws
    t0 = time.time()
    faulthandler.dump_traceback_later(30, exit=True)  # a hang prints where, then the rank exits
    print(f"[rank {rank}] fused calls done, shutting down ({a.order})", flush=True)
    if a.order == "runtime":
        distributed.shutdown()
    elif a.order == "free-first":
        distributed._STATE.peer = None
        gc.collect()
        torch.cuda.synchronize()
        dist.barrier()
        dist.destroy_process_group()
    else:
        torch.cuda.synchronize()
        dist.barrier()
    faulthandler.cancel_dump_traceback_later()
    print(f"[rank {rank}] shut down in {time.time() - t0:.2f} s ({a.order})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
