"""Arrival counters for kernels whose last program finishes the work of the others (serial split-K):
one int32 per output block, back at 0 after every call.

One fixed buffer per (device, user), made on first use and kept for the life of the process: CUDA graphs
capture its address, so it must never be reallocated. 16384 counters cover every grid here (GEMM column
blocks: lm_head 202048 / 64 = 3157 at tp 1).
"""
import torch

SIZE = 16384
_BUFFERS: dict = {}


def arrival_counters(device: torch.device, user: str, n: int) -> torch.Tensor:
    """Zeroed int32 counters for `user` (one buffer per kernel family, so two families never share
    a counter). The first call should be eager (warm-up before capture)."""
    if n > SIZE:
        raise ValueError(f"{user}: {n} arrival counters needed, at most {SIZE} exist; raise counters.SIZE")
    key = (torch.device(device), user)
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = torch.zeros(SIZE, dtype=torch.int32, device=device)
    return buf
