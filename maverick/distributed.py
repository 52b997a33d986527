"""Ranks, process groups and the collectives the model calls explicitly in forward().

One process per rank. With one rank every collective is the identity, so the model runs
unchanged without torch.distributed. gloo on CPU, NCCL on GPU.

The fused all-reduce lives here whole: the peer workspace (one buffer per call site, mapped into every
rank), its lifetime (enable before capture, checks, unmapped at shutdown) and the one function layers call,
all_reduce_add_rms_norm, with its fallback (NCCL + the add+norm kernel) where the workspace is off or the
call is too large.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _State:
    rank: int = 0
    world_size: int = 1
    peer: object = None  # maverick_plugins.PeerWorkspace once enable_peer_all_reduce succeeded
    peer_on: bool = True
    control: object = None  # a gloo group for step plans when the tensors go over NCCL


_STATE = _State()


def rank() -> int:
    return _STATE.rank


def world_size() -> int:
    return _STATE.world_size


def init(rank_: int, world_size_: int, backend: str, init_method: str, timeout_s: float = 300.0) -> None:
    """Join the tensor-parallel group (all ranks of this engine)."""
    import datetime

    _STATE.rank, _STATE.world_size = rank_, world_size_
    if world_size_ > 1 and not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank_, world_size=world_size_,
                                timeout=datetime.timedelta(seconds=timeout_s))
        if backend == "nccl":  # an object over NCCL goes through the GPU and waits for the queued steps
            _STATE.control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def shutdown(timeout_s: float = 30.0) -> None:
    """Leave the group. Collective: every rank calls it at about the same time (with CUDA graphs freed
    first). The teardown runs in a thread and is given timeout_s: a teardown that hangs (seen on GPUs
    with graphs alive, benchmarks/HISTORY.md) is logged and left to process exit instead of hanging the caller."""
    if _STATE.peer is not None and dist.is_initialized():
        torch.cuda.synchronize()  # no rank unmaps its peer buffers while another may still read them
        dist.barrier()
    _STATE.peer = None
    _STATE.control = None
    if dist.is_initialized():
        import gc
        import threading

        gc.collect()  # CUDA graphs left in reference cycles would keep NCCL's captured collectives alive
        t = threading.Thread(target=dist.destroy_process_group, name="maverick-tp-teardown", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            import logging

            logging.getLogger("maverick").warning(
                "rank %d: the tensor-parallel group did not shut down in %.0f s; left to process exit",
                _STATE.rank, timeout_s)
    _STATE.rank, _STATE.world_size = 0, 1


def enable_fused_all_reduce(model, device: torch.device, force: bool = False) -> bool:
    """Peer buffers for the two all-reduce + add + RMSNorm sites of every layer of `model`, as many rows as the
    kernel choice gives the fused path on this device (collective; before CUDA graph capture)."""
    from maverick_plugins import dispatch

    return enable_peer_all_reduce(2 * model.cfg.num_hidden_layers, dispatch.table(device).allreduce_max_tokens,
                                  model.cfg.hidden_size, model.spec.dtype, device, force)


def enable_peer_all_reduce(sites: int, rows: int, hidden: int, dtype: torch.dtype, device: torch.device,
                           force: bool = False) -> bool:
    """Map every rank's all-reduce buffers into every other rank (collective: all ranks call it, before
    CUDA graph capture). False, and NCCL stays in use, with one rank, where peers cannot be mapped, or
    or when MAVERICK_FUSED_ALLREDUCE=0 turns it off (unless force)."""
    from maverick import envs

    if _STATE.world_size == 1 or device.type != "cuda" or not (force or envs.fused_all_reduce()):
        return False
    import maverick_plugins as ops

    if not peer_rendezvous_can_meet():
        return False
    try:
        _STATE.peer = ops.PeerWorkspace(dist.group.WORLD.group_name, sites, rows, hidden, dtype, device)
    except (RuntimeError, ImportError) as e:  # no P2P between these GPUs, no symmetric memory in this torch
        import logging

        logging.getLogger("maverick").warning("fused all-reduce unavailable (%s); using NCCL", e)
        _STATE.peer = None
    return _STATE.peer is not None


def peer_rendezvous_can_meet() -> bool:
    """Collective. False on every rank (with a warning) unless all ranks' processes made the same number
    of peer-memory rendezvous so far (see maverick_plugins.PeerWorkspace): a mismatch would hang."""
    import maverick_plugins as ops

    counts = [None] * _STATE.world_size
    dist.all_gather_object(counts, ops.PeerWorkspace.rendezvous_done, group=_STATE.control)
    if len(set(counts)) == 1:
        return True
    import logging

    logging.getLogger("maverick").warning(
        "fused all-reduce unavailable: the ranks' processes made %s peer-memory rendezvous before (torch numbers "
        "them per process, so these ranks cannot meet; e.g. a second LLM in one script); using NCCL", counts)
    return False


def peer_workspace():
    return _STATE.peer if _STATE.peer_on else None


def check_peer_all_reduce() -> None:
    """Raise a clear error if a fused all-reduce barrier timed out (a sync; only with the fused path on)."""
    ws = peer_workspace()
    if ws is not None:
        ws.check()


def poll_peer_all_reduce() -> None:
    """check_peer_all_reduce without a sync, for every step: raises a step or two after a timeout."""
    ws = peer_workspace()
    if ws is not None:
        ws.poll()


def use_peer_all_reduce(enabled: bool) -> None:
    """Switch between the fused one-shot path and NCCL + add+norm (A/B runs; call on every rank alike)."""
    _STATE.peer_on = enabled


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel layer over the TP group (in place)."""
    if _STATE.world_size == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's shard along dim (vocab-parallel logits)."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's value (a size all ranks must agree on: the KV pool). Collective."""
    if _STATE.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.control)  # gloo: a host tensor
    return int(t)


def broadcast_object(obj, src: int = 0):
    """Send a picklable step plan from rank 0 to every rank (control path, not weights)."""
    if _STATE.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_STATE.control)
    return box[0]


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                            site: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + all_reduce(delta): one fused one-shot kernel over peer buffers when
    they are mapped and the call is small (decode), else the all-reduce and the fused add+norm.
    site: this call's place in the step (2 per layer); each site owns its peer buffer."""
    from maverick_plugins import add_rms_norm, dispatch

    ws = peer_workspace()
    if ws is not None and dispatch.active(delta) and ws.fits(delta, site):
        return ws.allreduce_add_rms_norm(x, delta, weight, eps, site)
    return add_rms_norm(x, all_reduce(delta), weight, eps)
