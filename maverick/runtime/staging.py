"""Host -> device transfer of a step's small inputs in one copy.

A decode step's inputs (ForwardBatch: 11 int64 tensors; sampling: 6 more) are a few hundred bytes.
Copied one tensor at a time they cost about 5 us of host time each, and `torch.tensor(values,
device=cuda)` even waits for the GPU (profiled on H200, `maverick-bench profile-engine`: 7 stream syncs per
step, 1.1 ms of a 4.1 ms batch-1 step outside the graph). Here every tensor of one dtype is a view of
one flat buffer: the host fills a pinned copy, one asynchronous copy moves it.

Each view starts on a 16-byte boundary: Triton specializes a kernel on whether each pointer argument is
16-byte aligned, so views packed end to end (an int64 view at an odd offset is only 8-byte aligned) made
the alignment of the attention kernels' inputs depend on the batch's shape, and each new combination compiled
the kernel again while serving (H200: 11 prefill-attention compiles after load, 28 with a draft).
"""
from __future__ import annotations

import math

import torch


class Staged:
    """Named views over one flat device buffer and its pinned host mirror (one dtype)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        self.device = torch.device(device)
        offsets, total = _layout([math.prod(s) for s in shapes.values()], dtype)
        self.dev = torch.zeros(total, dtype=dtype, device=self.device)
        pin = self.device.type == "cuda"
        self.host = torch.zeros(total, dtype=dtype, pin_memory=pin)
        self.views: dict[str, torch.Tensor] = {}
        self._host_views: dict[str, torch.Tensor] = {}
        for (name, shape), at in zip(shapes.items(), offsets):
            n = math.prod(shape)
            self.views[name] = self.dev[at:at + n].view(shape)
            self._host_views[name] = self.host[at:at + n].view(shape)
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
    if not tensors:
        return {}
    dtype = next(iter(tensors.values())).dtype
    offsets, total = _layout([t.numel() for t in tensors.values()], dtype)
    flat = torch.empty(total, dtype=dtype, pin_memory=True)
    for t, at in zip(tensors.values(), offsets):
        flat[at:at + t.numel()] = t.reshape(-1)
    dev = flat.to(device, non_blocking=True)  # the caching host allocator keeps `flat` until the copy ran
    return {name: dev[at:at + t.numel()].view(t.shape) for (name, t), at in zip(tensors.items(), offsets)}


ALIGN_BYTES = 16  # Triton's pointer specialization: 16-byte aligned or not


def _layout(sizes: list[int], dtype: torch.dtype) -> tuple[list[int], int]:
    """Element offsets of views of these sizes in one flat buffer, each on an ALIGN_BYTES boundary, and the
    buffer's size (at least 1)."""
    step = max(1, ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size())
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at += -(-n // step) * step
    return offsets, max(at, 1)


def take_fed_tokens(input_ids: torch.Tensor, src: torch.Tensor, feed: torch.Tensor) -> None:
    """input_ids[t] = feed[src[t]] where src[t] >= 0, on the device: the overlap scheduler feeds a token
    sampled by the previous step without reading it on the host (fixed shapes, no sync)."""
    input_ids.copy_(torch.where(src >= 0, feed.index_select(0, src.clamp(min=0)), input_ids))
