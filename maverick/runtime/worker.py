"""Ranks 1..N-1: join the group, load this rank's weights, then run every step rank 0 broadcasts.

Rank 0 lives in the user's process (it owns the scheduler and tokenizer); the others are spawned
by LLM or started by mpirun. All ranks run the same forward; only rank 0 samples.
"""
from __future__ import annotations

import torch

from maverick import distributed as dist

from .kv_budget import KvCacheConfig, pool_blocks

STOP = "stop"


def build_runner(engine_dir, cfg, rank: int, device: torch.device, cuda_graphs: bool = True,
                 kv_cache_config: KvCacheConfig | None = None):
    from .engine_loader import load_draft, load_rank_model
    from .model_runner import ModelRunner

    b = cfg.build
    b.check_device(torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    model = load_rank_model(engine_dir, cfg, rank, device, progress=rank == 0)
    dist.enable_fused_all_reduce(model, device)
    draft = load_draft(engine_dir, cfg, device, rank)
    free = None
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the loader's freed staging copies would otherwise count as used
        free = torch.cuda.mem_get_info(device)[0]
    global_blocks, local_blocks = pool_blocks(cfg, KvCacheConfig.of(kv_cache_config), free)
    runner = ModelRunner(model, max_seq_len=b.max_seq_len, max_batch_size=b.max_batch_size,
                         block_size=b.kv_cache_block_size, device=device, num_global_blocks=global_blocks,
                         num_local_blocks=local_blocks)
    if draft is not None:
        runner.attach_draft(draft, cfg.speculative.max_draft_len)
    if device.type == "cuda":
        runner.warmup(b.max_num_tokens)
    if cuda_graphs and device.type == "cuda":
        runner.capture_cuda_graphs(b.graph_batch_sizes(),
                                   b.graph_prefill_tokens(), progress=rank == 0)
    return runner


def join_group(rank: int, world: int, backend: str, init_method: str, timeout_s: float) -> None:
    dist.init(rank, world, backend, init_method, timeout_s)


def serve_steps(runner) -> None:
    """Follow rank 0: each broadcast is a step (plan: a list of StepSeq, sampling rows) or STOP. Every
    rank samples too (the gathered logits are the same bits on every rank, so are the tokens): the
    overlap scheduler's next step takes its tokens from the device on every rank."""
    tokens = None
    while True:
        msg = dist.broadcast_object(None)
        if isinstance(msg, str) and msg == STOP:
            return
        plan, rows = msg
        tokens = runner.step(plan, rows, tokens).tokens


def worker_main(rank: int, world: int, engine_dir: str, device_kind: str, backend: str, init_method: str,
                timeout_s: float, cuda_graphs: bool = True, kv_cache_config: KvCacheConfig | None = None) -> None:
    """A rank started by LLM (maverick.runtime.rank_main): join, load, follow rank 0 until STOP."""
    from maverick import envs

    from .engine_loader import open_engine

    if envs.hang_dump_s() > 0:
        import faulthandler

        faulthandler.dump_traceback_later(envs.hang_dump_s(), repeat=True)
    try:
        device = torch.device(f"cuda:{rank}") if device_kind == "cuda" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        join_group(rank, world, backend, init_method, timeout_s)
        cfg = open_engine(engine_dir, verify=False)  # rank 0 verified every file's hash
        runner = build_runner(engine_dir, cfg, rank, device, cuda_graphs, kv_cache_config)
        serve_steps(runner)
        runner.release_graphs()  # before the group's teardown in `finally`
    finally:
        dist.shutdown()
