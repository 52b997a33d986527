"""All-reduce of a row-parallel layer's partial output fused with the residual add and RMSNorm.

Reference: sum the ranks' partials (in fp32, then rounded to the activation dtype, which is what
an all-reduce returns) and run add_rms_norm. The GPU kernel is a one-shot all-reduce over peer
buffers (PyTorch symmetric memory, multicast off) with the add and the norm in the same launch;
where peers cannot map each other's memory the caller falls back to NCCL + add_rms_norm.
"""
from __future__ import annotations

import torch

from .norm import add_rms_norm_ref


def allreduce_add_rms_norm_ref(x: torch.Tensor, partials: list[torch.Tensor], weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What every rank must get back: (h, rms_norm(h)) with h = x + sum(partials)."""
    delta = torch.stack([p.float() for p in partials]).sum(0).to(x.dtype)
    return add_rms_norm_ref(x, delta, weight, eps)


class PeerWorkspace:
    """One peer-visible buffer per all-reduce call site ([sites, rows, hidden]) and signal pads.

    Every rank of `group_name` must construct it (rendezvous is collective), before any CUDA graph
    is captured. rows bounds the tokens of a fused call: 16 x 5120 bf16 x 96 sites = 15.7 MB.
    Only ranks that have made the same number of rendezvous in their processes can meet: torch numbers
    them with a process-wide counter in its store keys, so a process that rendezvoused before (an
    earlier LLM in the same script) waits forever on freshly spawned workers (2xH100, benchmarks/HISTORY.md).
    Compare rendezvous_done across ranks first (maverick.distributed.peer_rendezvous_can_meet).
    """

    rendezvous_done = 0  # in this process, over all instances

    def __init__(self, group_name: str, sites: int, rows: int, hidden: int, dtype: torch.dtype,
                 device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.sites, self.rows, self.hidden = sites, rows, hidden
        self.buffer = symm_mem.empty(sites, rows, hidden, dtype=dtype, device=device)
        PeerWorkspace.rendezvous_done += 1  # counted even if it fails: torch's counter moved as well
        handle = symm_mem.rendezvous(self.buffer, group_name)
        self.rank, self.world = handle.rank, handle.world_size
        pad = handle.get_signal_pad(handle.rank, dtype=torch.int32)
        self.spare_slot = rows * self.world
        if pad.numel() < (rows + 2) * self.world:
            raise RuntimeError(f"signal pad has {pad.numel()} int32 slots, need (rows + 2) x world = "
                               f"{(rows + 2) * self.world}")
        self.buf_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.pad_ptrs = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        self.errors = torch.zeros(3, dtype=torch.int32, device=device)  # see allreduce_add_rms_norm_triton
        self._handle = handle  # keeps the mapping alive
        self._lagged = LaggedErrors(self.errors, self.rank)
        # Every pad is zero before anyone signals, and the barrier that says so must not use the pads:
        # a device barrier over them (handle.barrier(), the same slots and protocol) let a fast rank's
        # signal land before a slow rank's zero_() ran and be wiped; the slow rank then consumed its
        # peers' next signal as the lost one and ran one call behind ever after: wrong sums, and a
        # timed-out last barrier with "no signal" from anyone (4xH200, benchmarks/HISTORY.md).
        pad.zero_()
        torch.cuda.synchronize(device)
        import torch.distributed as dist

        dist.barrier(group=dist.distributed_c10d._resolve_process_group(group_name))

    def fits(self, delta: torch.Tensor, site: int) -> bool:
        return (delta.is_cuda and delta.dim() == 2 and delta.shape[0] <= self.rows
                and delta.shape[1] == self.hidden and delta.dtype == self.buffer.dtype and 0 <= site < self.sites)

    def allreduce_add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                               site: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .kernels.allreduce_norm import allreduce_add_rms_norm_triton

        return allreduce_add_rms_norm_triton(x, delta, weight, eps, self.buf_ptrs, self.pad_ptrs, self.rank,
                                             self.world, site, site * self.rows * self.hidden, self.spare_slot,
                                             self.errors)

    def check(self) -> None:
        """Raise if any fused barrier timed out since creation (reads 3 ints from the GPU: a sync)."""
        raise_on_barrier_timeouts(self.errors, self.rank)

    def poll(self) -> None:
        """check() for the step loop: never waits for the GPU (a timeout surfaces a step or two late)."""
        self._lagged.poll()


class LaggedErrors:
    """Reads a device error record on the host without a stream sync: each poll looks at the copy the
    previous poll queued, once it has landed, then queues a fresh one. (A blocking read every step
    made the host wait for the queued step and undid the overlap scheduler.)"""

    def __init__(self, errors: torch.Tensor, rank: int):
        self.errors, self.rank = errors, rank
        cuda = errors.is_cuda
        self.host = torch.zeros(errors.shape, dtype=errors.dtype, pin_memory=cuda)
        self.landed = torch.cuda.Event() if cuda else None
        self.queued = False

    def poll(self) -> None:
        if self.queued:
            if self.landed is not None and not self.landed.query():
                return  # the last copy is still behind queued work: look next time
            raise_on_barrier_timeouts(self.host, self.rank)
        self.host.copy_(self.errors, non_blocking=True)
        if self.landed is not None:
            self.landed.record()
        self.queued = True


def raise_on_barrier_timeouts(errors: torch.Tensor, rank: int) -> None:
    count, site, peers = errors.tolist()
    if count:
        unseen = [p for p in range(8) if peers >> p & 1]
        unsent = [p for p in range(8) if peers >> (8 + p) & 1]
        raise RuntimeError(
            f"fused all-reduce on rank {rank}: {count} barrier(s) timed out, the last at call site {site}; "
            f"no signal from rank(s) {unseen}, could not signal rank(s) {unsent} (their previous signal was "
            f"never consumed). The results of those calls are wrong; the peer buffers are out of step. "
            f"Run with MAVERICK_FUSED_ALLREDUCE=0 (NCCL) and report this.")
