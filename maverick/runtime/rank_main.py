"""Entry point of a rank that LLM starts (python -m maverick.runtime.rank_main): join the group, load this
rank's weights, follow rank 0's steps. Any error is printed (its last line is what rank 0 reports) and ends
the process with status 1."""
from __future__ import annotations

import argparse
import sys
import traceback


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maverick.runtime.rank_main")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--engine", required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p.add_argument("--backend", choices=["nccl", "gloo"], required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--kv-cache-config", default="{}", help="KvCacheConfig's fields as JSON")
    a = p.parse_args(argv)
    try:
        import json

        from .kv_budget import KvCacheConfig
        from .worker import worker_main

        worker_main(a.rank, a.world, a.engine, a.device, a.backend, a.init, a.timeout, not a.no_cuda_graphs,
                    KvCacheConfig.of(json.loads(a.kv_cache_config)))
    except BaseException as e:
        traceback.print_exc()
        print(f"rank {a.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
