"""Arrival counters for kernels whose last program to finish does the final step (split-K reductions,
the router's top-k): one int32 per program group, which that last program sets back to 0."""
import torch
import triton
import triton.language as tl

SLOTS = 16384  # groups of any grid here (fp8_gemm's lm_head at tp 1: 202048 / 64 = 3157 column blocks)
_BUFFERS: dict = {}


def arrival_counters(device: torch.device, n: int, owner: str) -> torch.Tensor:
    """A fixed zeroed buffer per (device, owner kernel), made on first use (an eager warm-up, before any
    graph capture) and never reallocated: captured graphs hold its address. Separate owners keep kernels
    that might run on two streams at once off each other's counters."""
    if n > SLOTS:
        raise ValueError(f"{owner}: {n} program groups need arrival counters, at most {SLOTS} exist")
    key = (torch.device(device), owner)
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.zeros(SLOTS, dtype=torch.int32, device=device)
    return _BUFFERS[key]


@triton.jit
def last_to_arrive(slot, count):
    """Called by each of the `count` programs of a group after it stored its part: True in the last one to
    arrive, which then sees every other part (the barrier orders this program's threads' stores before its
    release; acq_rel makes the others' visible). That program calls reset_arrivals(slot) when done."""
    tl.debug_barrier()
    return tl.atomic_add(slot, 1, sem="acq_rel", scope="gpu") == count - 1


@triton.jit
def reset_arrivals(slot):
    """Back to 0 for the next call (and the next graph replay)."""
    tl.atomic_xchg(slot, 0)
