"""Host -> device transfer of a step's small inputs in one copy.

A decode step's inputs (ForwardBatch: 11 int64 tensors; sampling: 6 more) are a few hundred bytes.
Copied one tensor at a time they cost about 5 us of host time each, and `torch.tensor(values,
device=cuda)` even waits for the GPU (profiled on H200, `maverick-bench profile-engine`: 7 stream syncs per
step, 1.1 ms of a 4.1 ms batch-1 step outside the graph). Here every tensor of one dtype is a view of
one flat buffer: the host fills a pinned copy, one asynchronous copy moves it.
"""
from __future__ import annotations

import math

import torch


class Staged:
    """Named views over one flat device buffer and its pinned host mirror (one dtype)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        self.device = torch.device(device)
        total = sum(math.prod(s) for s in shapes.values())
        self.dev = torch.zeros(max(total, 1), dtype=dtype, device=self.device)
        pin = self.device.type == "cuda"
        self.host = torch.zeros(max(total, 1), dtype=dtype, pin_memory=pin)
        self.views: dict[str, torch.Tensor] = {}
        self._host_views: dict[str, torch.Tensor] = {}
        at = 0
        for name, shape in shapes.items():
            n = math.prod(shape)
            self.views[name] = self.dev[at:at + n].view(shape)
            self._host_views[name] = self.host[at:at + n].view(shape)
            at += n
        self._arrays = {name: v.numpy() for name, v in self._host_views.items()}
        self._copied = torch.cuda.Event() if pin else None
        self._in_flight = False

    def _wait(self) -> None:
        if self._in_flight:  # wait until the last upload has left the pinned buffer before overwriting it
            self._copied.synchronize()
            self._in_flight = False

    def host_arrays(self) -> dict:
        """The host side's views as numpy arrays, to fill in place before upload() (saves a copy a view)."""
        self._wait()
        return self._arrays

    def write(self, name: str, values: torch.Tensor | list) -> None:
        """Fill the host side of one view (a tensor or list of its exact shape)."""
        self._wait()
        dst = self._host_views[name]
        src = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dst.dtype)
        if src.shape != dst.shape:
            raise ValueError(f"{name}: got shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        if src.data_ptr() != dst.data_ptr():  # else filled in place (host_arrays)
            dst.copy_(src)

    def upload(self) -> None:
        """One copy host -> device on the current stream (asynchronous on CUDA)."""
        self.dev.copy_(self.host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
            self._in_flight = True


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move CPU tensors of one dtype to `device` in one copy (through pinned memory on CUDA)."""
    device = torch.device(device)
    if device.type == "cpu":
        return dict(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).pin_memory()
    dev = flat.to(device, non_blocking=True)  # the caching host allocator keeps `flat` until the copy ran
    out, at = {}, 0
    for name, t in tensors.items():
        out[name] = dev[at:at + t.numel()].view(t.shape)
        at += t.numel()
    return out


def take_fed_tokens(input_ids: torch.Tensor, src: torch.Tensor, feed: torch.Tensor) -> None:
    """input_ids[t] = feed[src[t]] where src[t] >= 0, on the device: the overlap scheduler feeds a token
    sampled by the previous step without reading it on the host (fixed shapes, no sync)."""
    input_ids.copy_(torch.where(src >= 0, feed.index_select(0, src.clamp(min=0)), input_ids))
