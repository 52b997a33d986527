"""CUDA graphs for decode steps: static ForwardBatch buffers per captured batch size, padding, replay.

A decode step is hundreds of small kernels; launched eagerly each costs about 7 us of host time
(shared/REFERENCE.md section 7), so a 48-layer step would be launch-bound. One graph replay launches
them all. Shapes a graph fixes: batch rows (padded with empty sequences that write only to the
scratch block), one new token per sequence, and the global block-table width (max_seq_len).
"""
from __future__ import annotations

from dataclasses import fields

import torch

from maverick.layers.forward_batch import ForwardBatch


class DecodeGraphs:
    def __init__(self, model, kv_caches, batch_sizes: list[int], global_blocks: int, local_blocks: int,
                 device: torch.device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = sorted(batch_sizes)
        self.global_blocks, self.local_blocks = global_blocks, local_blocks
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, ForwardBatch, torch.Tensor]] = {}
        self.pool = None

    def size_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def capture(self, make_batch) -> None:
        """make_batch(b) -> a valid decode ForwardBatch of b rows (on the CPU) used as capture input."""
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            static = make_batch(b).to(self.device)
            with torch.inference_mode():
                for _ in range(2):  # compile the Triton kernels and warm the allocator outside capture
                    self.model(static, self.kv_caches)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.model(static, self.kv_caches)
            self.pool = graph.pool()
            self.graphs[b] = (graph, static, out)

    def replay(self, batch: ForwardBatch, n_rows: int) -> torch.Tensor:
        """batch must already be padded to a captured size; returns logits of the first n_rows."""
        graph, static, out = self.graphs[batch.q_index.shape[0]]
        for f in fields(ForwardBatch):
            getattr(static, f.name).copy_(getattr(batch, f.name), non_blocking=True)
        graph.replay()
        return out[:n_rows]
