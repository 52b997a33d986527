"""Arrival counters for kernels whose last program to finish does the final step (split-K reductions,
the router's top-k): one int32 per program group, which that last program sets back to 0."""
import torch

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
