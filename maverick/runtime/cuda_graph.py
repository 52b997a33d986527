"""CUDA graphs for decode steps: static inputs per captured batch size, padding, replay, sampling.

A decode step is hundreds of small kernels; launched eagerly each costs about 7 us of host time
(shared/REFERENCE.md section 7), so a 48-layer step would be launch-bound. One graph replay launches
them all. Shapes a graph fixes: batch rows (padded with empty sequences that write only to the
scratch block), one new token per sequence, and the global block-table width (max_seq_len).

Each size has two graphs over one memory pool: the forward (ForwardBatch -> logits) and the sampler
(logits + SamplingTensors -> tokens, about 80 small kernels eager: sort, hash noise, filters). A
greedy step skips the sampler graph and takes one argmax. The inputs of both live in two flat
buffers (int64, fp32) filled by one host -> device copy each (maverick/runtime/staging.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.sampler import SamplingTensors, sample

from .sampling_rows import FLOAT_FIELDS, INT_FIELDS, SamplingRows
from .staging import Staged, take_fed_tokens


@dataclass
class _Captured:
    forward: torch.cuda.CUDAGraph
    sampler: torch.cuda.CUDAGraph
    ints: Staged  # ForwardBatch fields + integer sampling fields
    floats: Staged  # fp32 sampling fields
    logits: torch.Tensor  # [rows, vocab] output of `forward`
    tokens: torch.Tensor  # [rows] output of `sampler`


class DecodeGraphs:
    def __init__(self, model, kv_caches, batch_sizes: list[int], global_blocks: int, local_blocks: int,
                 device: torch.device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.sizes = sorted(batch_sizes)
        self.global_blocks, self.local_blocks = global_blocks, local_blocks
        self.graphs: dict[int, _Captured] = {}
        self.pool = None

    def size_for(self, batch: int) -> int | None:
        return next((s for s in self.sizes if s >= batch), None)

    def capture(self, make_batch) -> None:
        """make_batch(b) -> a valid decode ForwardBatch of b rows (on the CPU) used as capture input."""
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            proto = make_batch(b)
            ints = Staged({**{k: tuple(t.shape) for k, t in proto.tensors().items()},
                           **{k: (b,) for k in INT_FIELDS}, "feed_src": (b,)}, torch.int64, self.device)
            floats = Staged({k: (b,) for k in FLOAT_FIELDS}, torch.float32, self.device)
            self._write(ints, floats, proto, SamplingRows([], [], [], [], [], []).padded(b))
            batch = ForwardBatch(**{k: ints.views[k] for k in proto.tensors()})
            params = SamplingTensors(**{k: ints.views[k] for k in INT_FIELDS},
                                     **{k: floats.views[k] for k in FLOAT_FIELDS})
            with torch.inference_mode():
                for _ in range(2):  # compile the Triton kernels and warm the allocator outside capture
                    sample(self.model(batch, self.kv_caches), params)
                torch.cuda.synchronize(self.device)
                forward, sampler = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
                with torch.cuda.graph(forward, pool=self.pool):
                    logits = self.model(batch, self.kv_caches)
                self.pool = forward.pool()
                with torch.cuda.graph(sampler, pool=self.pool):  # replayed right after `forward`, never alone
                    tokens = sample(logits, params)
            self.graphs[b] = _Captured(forward, sampler, ints, floats, logits, tokens)

    @staticmethod
    def _write(ints: Staged, floats: Staged, batch: ForwardBatch, rows: SamplingRows | None) -> None:
        for k, t in batch.tensors().items():
            ints.write(k, t)
        if rows is not None:
            for k in INT_FIELDS:
                ints.write(k, getattr(rows, k))
            for k in FLOAT_FIELDS:
                floats.write(k, getattr(rows, k))
            floats.upload()
        ints.upload()

    def stage(self, batch: ForwardBatch) -> torch.cuda.CUDAGraph:
        """Write a padded decode batch (CPU) into its graph's static inputs; returns the forward graph, whose
        replays then recompute that batch's logits (benchmarks time exactly these replays)."""
        g = self.graphs[batch.q_index.shape[0]]
        self._write(g.ints, g.floats, batch, None)
        return g.forward

    def replay(self, batch: ForwardBatch, rows: SamplingRows | None, n_rows: int, feed: torch.Tensor | None = None,
               feed_src: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """batch (CPU) must already be padded to a captured size. Returns the logits of the first n_rows
        and, if rows are given, their sampled tokens (on the device, not yet synchronized). feed_src:
        per token, the row of `feed` (the previous step's tokens on the device) to take instead, or -1."""
        g = self.graphs[batch.q_index.shape[0]]
        greedy = rows is None or rows.greedy
        if feed_src is not None:
            g.ints.write("feed_src", feed_src)
        self._write(g.ints, g.floats, batch, None if greedy else rows.padded(g.logits.shape[0]))
        if feed_src is not None:
            take_fed_tokens(g.ints.views["input_ids"], g.ints.views["feed_src"], feed)
        g.forward.replay()
        if rows is None:
            return g.logits[:n_rows], None
        if greedy:
            return g.logits[:n_rows], g.logits[:n_rows].argmax(dim=-1)
        g.sampler.replay()
        return g.logits[:n_rows], g.tokens[:n_rows]
