"""A step's sampling parameters on the host: one entry per sampled row, in the order of the logits."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from maverick.layers.sampler import SamplingTensors

from .staging import to_device

INT_FIELDS = ("top_k", "seeds", "offsets")
FLOAT_FIELDS = ("temperature", "top_p", "min_p")


@dataclass
class SamplingRows:
    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    min_p: list[float]
    seeds: list[int]
    offsets: list[int]  # tokens generated so far: the counter of the request's noise

    @classmethod
    def of(cls, requests, pending: int = 0) -> "SamplingRows":
        """pending: tokens each request has sampled on the GPU that its output does not hold yet."""
        ps = [r.params for r in requests]
        return cls([p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps], [p.min_p for p in ps],
                   [_int64(r.seed) for r in requests], [len(r.output_token_ids) + pending for r in requests])

    def __len__(self) -> int:
        return len(self.temperature)

    @property
    def greedy(self) -> bool:
        """Every row takes the argmax (temperature 0 or top_k 1): no sort, no noise needed."""
        return all(t == 0 or k == 1 for t, k in zip(self.temperature, self.top_k))

    def take(self, indices: list[int]) -> "SamplingRows":
        """These rows, in this order (a step run as several graph replays samples each part's rows)."""
        return SamplingRows(**{f.name: [getattr(self, f.name)[i] for i in indices] for f in fields(self)})

    def padded(self, rows: int) -> "SamplingRows":
        """Pad to `rows` with greedy rows (a CUDA graph's fixed batch; their tokens are dropped)."""
        n = rows - len(self)
        pad = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seeds=0, offsets=0)
        return SamplingRows(**{f.name: getattr(self, f.name) + [pad[f.name]] * n for f in fields(self)})

    def to_tensors(self, device: torch.device) -> SamplingTensors:
        """Two host -> device copies (int64 and fp32 fields), no stream sync."""
        ints = to_device({k: torch.tensor(getattr(self, k), dtype=torch.int64) for k in INT_FIELDS}, device)
        floats = to_device({k: torch.tensor(getattr(self, k), dtype=torch.float32) for k in FLOAT_FIELDS}, device)
        return SamplingTensors(**ints, **floats)


def _int64(seed: int) -> int:
    """A 64-bit unsigned seed as the int64 of the same bits (the tensor's dtype)."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed
