"""A step whose GPU work is queued but whose sampled tokens the host has not read yet.

The overlap scheduler (EngineCore, on by default like TensorRT-LLM's) queues step n+1 before it reads
step n's tokens, so the host's scheduling, input building and graph launch (0.13 ms at batch 1, 1.3 ms
at batch 64 on H200, benchmarks/HISTORY.md) run while the GPU computes. Everything step n's host side will
read is copied to pinned memory right after it is queued, before step n+1 can overwrite the graphs'
static outputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick.layers.sampler import logprobs

from .request import Request
from .scheduler import Scheduled


@dataclass
class Launched:
    sched: list[Scheduled]  # what ran
    sampled: list[Request]  # one per row of tokens, in order
    tokens: torch.Tensor  # [rows] on the device: feeds the next step without a host round trip
    host: list[torch.Tensor]  # tokens (+ logprobs: chosen, top values, top ids) on the host, once `done`
    done: torch.cuda.Event | None

    @classmethod
    def queue(cls, sched: list[Scheduled], sampled: list[Request], logits: torch.Tensor,
              tokens: torch.Tensor | None) -> "Launched":
        if tokens is None:
            return cls(sched, sampled, tokens, [], None)
        want = [r.params.logprobs for r in sampled if r.params.logprobs is not None]
        out = [tokens] + (list(logprobs(logits, tokens, max(want))) if want else [])
        if tokens.device.type != "cuda":
            return cls(sched, sampled, tokens, out, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in out]
        for h, t in zip(host, out):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(sched, sampled, tokens, host, done)

    def results(self) -> tuple[list[int], list | None]:
        """Token ids per row, and [chosen, top values, top ids] logprob lists if any row asked (waits)."""
        if self.done is not None:
            self.done.synchronize()
        lists = [t.tolist() for t in self.host]
        return lists[0], (lists[1:] or None)
