"""CUDA graphs for whole steps: static inputs per captured shape, padding, replay, sampling.

A step is hundreds of small kernels (about 40 a layer); launched eagerly each costs about 7 us of host
time, measured on H100 and H200), so a 48-layer step is launch-bound: a decode step, and a prefill
too (one 128-token prompt, one-rank TP8 on H200: 59 ms of host time for 15.6 ms of GPU work). One graph
replay launches them all. A graph's shape is (rows, q): `rows` sequences of `q` new tokens each, rows * q
tokens in all. Decode graphs are (batch, 1); prefill graphs (1, tokens) take one sequence's prompt chunk
padded up to `tokens` (padding tokens sit at position -1 and write to the scratch block). The block-table
widths are fixed too (max_seq_len).

Each shape has two graphs over one memory pool: the forward (ForwardBatch -> logits) and the sampler
(logits + SamplingTensors -> tokens, about 80 small kernels eager: sort, hash noise, filters). A
greedy step skips the sampler graph and takes one argmax. The inputs of both live in two flat
buffers (int64, fp32) filled by one host -> device copy each (maverick/runtime/staging.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from tqdm import tqdm

from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.sampler import FLOAT_FIELDS, INT_FIELDS, SamplingRows, SamplingTensors, sample, sample_tokens

from .batch import build_forward_batch
from .kv_cache import SeqBlocks
from .speculative import accept_steady_greedy
from .staging import Staged, take_fed_tokens
from .step import StepSeq


@dataclass
class _Captured:
    forward: torch.cuda.CUDAGraph
    sampler: torch.cuda.CUDAGraph
    ints: Staged  # ForwardBatch fields + integer sampling fields
    floats: Staged  # fp32 sampling fields
    logits: torch.Tensor  # [rows, vocab] output of `forward`
    tokens: torch.Tensor  # [rows] output of `sampler`


Shape = tuple[int, int]  # (rows, q): rows sequences of q new tokens each


def graph_shape(token_counts: list[int], num_logits: list[int], batch_sizes: list[int],
                prefill_tokens: list[int], verify_q: int = 0) -> Shape | None:
    """The captured shape a step replays, or None (eager). A step of one new token per sequence takes the
    smallest decode graph with enough rows; a verification step (speculative decoding: every sequence wants
    the logits of each of its tokens, up to verify_q of them) the verify graph (rows, verify_q); one
    sequence's chunk of n > 1 tokens (with its last token's logits or none), the smallest prefill graph of
    at least n tokens. Other steps fit no one graph: prompt chunks beside decode rows or beside each other
    (ModelRunner may replay them as several graphs)."""
    rows = next((b for b in sorted(batch_sizes) if b >= len(token_counts)), None)
    if all(t == 1 for t in token_counts):
        if any(n != 1 for n in num_logits):  # logits row i is sequence i
            return None
        return None if rows is None else (rows, 1)
    if verify_q and all(n == t <= verify_q for n, t in zip(num_logits, token_counts)):
        return None if rows is None else (rows, verify_q)
    if len(token_counts) == 1 and num_logits[0] in (0, 1):  # 0: a chunk before the prompt's last
        q = next((t for t in sorted(prefill_tokens) if t >= token_counts[0]), None)
        return None if q is None else (1, q)
    return None


# Prompt chunks beside decode rows run as graph replays of their own when it pays. Each replay reads the
# weights again; eager, such a step is 52-63 ms of launches. One-rank TP8 on H200, 4 decode rows at 1K: one
# 128-token chunk 93-98 -> 20 ms, 128+128+128 57 -> 54, 512+512+512 59 -> 90 (benchmarks/TUNING.md has every
# case). So one chunk always (graphs go to 2048 tokens), several only up to PROMPT_REPLAY_TOKENS together.
MAX_PROMPT_REPLAYS, PROMPT_REPLAY_TOKENS = 4, 256


def graph_parts(token_counts: list[int], num_logits: list[int], batch_sizes: list[int],
                prefill_tokens: list[int], verify_q: int = 0) -> list[tuple[list[int], Shape]] | None:
    """A step no one graph fits (prompt chunks beside decode rows, or beside each other) as several replays:
    the decode rows together, then each chunk alone, as (sequence indices, graph shape), when every part has
    a captured graph and, with several chunks, at most MAX_PROMPT_REPLAYS of them hold PROMPT_REPLAY_TOKENS
    graph tokens together (measured above); else None (eager)."""
    rows = [n == 1 or (verify_q and num_logits[i] == n <= verify_q) for i, n in enumerate(token_counts)]
    prompts = [[i] for i, r in enumerate(rows) if not r]
    decode = [i for i, r in enumerate(rows) if r]
    parts = ([decode] if decode else []) + prompts
    if not prompts or len(prompts) > MAX_PROMPT_REPLAYS or len(parts) < 2:
        return None
    shapes = [graph_shape([token_counts[i] for i in part], [num_logits[i] for i in part], batch_sizes,
                          prefill_tokens, verify_q) for part in parts]
    if None in shapes:
        return None
    if len(prompts) > 1 and sum(r * q for r, q in shapes[len(parts) - len(prompts):]) > PROMPT_REPLAY_TOKENS:
        return None
    return list(zip(parts, shapes))


class StepGraphs:
    """verify_q > 0 (speculative decoding): graphs (rows, verify_q) for every decode batch size, which give the
    logits of every token (a verify step: k + 1 rows a sequence); other graphs give one a sequence."""

    def __init__(self, model, kv_caches, shapes: list[Shape], device: torch.device, verify_q: int = 0):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.verify_q = verify_q
        decode = sorted(r for r, q in shapes if q == 1)
        shapes = list(shapes) + [(r, verify_q) for r in decode if verify_q > 1]
        self.shapes = sorted(set(shapes), key=lambda s: (s[0] * s[1], s))
        # looked up every step: derived once
        self.batch_sizes = decode
        self.prefill_tokens = sorted(q for r, q in self.shapes if r == 1 and q > 1)
        self.graphs: dict[Shape, _Captured] = {}
        self.pool = None

    def shape_for(self, token_counts: list[int], num_logits: list[int]) -> Shape | None:
        return graph_shape(token_counts, num_logits, self.batch_sizes, self.prefill_tokens, self.verify_q)

    def parts_for(self, token_counts: list[int], num_logits: list[int]) -> list[tuple[list[int], Shape]] | None:
        return graph_parts(token_counts, num_logits, self.batch_sizes, self.prefill_tokens, self.verify_q)

    def logits_rows(self, shape: Shape) -> int:
        """Logits rows a graph of this shape computes: every token's in a verify graph, else one a sequence."""
        rows, q = shape
        return rows * q if q == self.verify_q else rows

    def capture(self, make_batch, progress: bool = False) -> None:
        """make_batch(shape) -> a valid ForwardBatch of that shape (on the CPU) used as capture input.
        progress: a bar over the shapes (full-size Maverick on H200: 4 decode and 11 prefill graphs, 7-15 s)."""
        shapes = list(reversed(self.shapes))  # most tokens first, so smaller graphs reuse its memory pool
        for shape in tqdm(shapes, desc="capture CUDA graphs", unit="graph", disable=not progress):
            proto = make_batch(shape)
            b = proto.logits_indices.shape[0]  # sampled rows
            ints = Staged({**{k: tuple(t.shape) for k, t in proto.tensors().items()},
                           **{k: (b,) for k in INT_FIELDS}, "feed_src": (proto.num_tokens,)},
                          torch.int64, self.device)
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
            self.graphs[shape] = _Captured(forward, sampler, ints, floats, logits, tokens)

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

    def host_arrays(self, shape: Shape) -> dict:
        """The ForwardBatch fields of the graph of `shape` in its pinned staging buffer, as numpy arrays that
        build_forward_batch fills in place (then replay copies nothing into it)."""
        arrays = self.graphs[tuple(shape)].ints.host_arrays()
        return {f.name: arrays[f.name] for f in fields(ForwardBatch)}

    def stage(self, batch: ForwardBatch) -> torch.cuda.CUDAGraph:
        """Write a padded batch (CPU) into its graph's static inputs; returns the forward graph, whose
        replays then recompute that batch's logits (benchmarks time exactly these replays)."""
        g = self.graphs[tuple(batch.q_index.shape)]
        self._write(g.ints, g.floats, batch, None)
        return g.forward

    def replay(self, batch: ForwardBatch, rows: SamplingRows | None, n_rows: int, feed: torch.Tensor | None = None,
               feed_src: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """batch (CPU) must already be padded to a captured shape. Returns the logits of the first n_rows
        and, if rows are given, their sampled tokens (on the device, not yet synchronized). feed_src:
        per token, the row of `feed` (the previous step's tokens on the device) to take instead, or -1."""
        g = self.graphs[tuple(batch.q_index.shape)]
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
            return g.logits[:n_rows], sample_tokens(g.logits[:n_rows], None)
        g.sampler.replay()
        return g.logits[:n_rows], g.tokens[:n_rows]


SHARED_TABLE = "extend.global_block_table"  # a round's extend reads the verify's block table (the same rows)


class RoundGraphs:
    """On CUDA, a steady round as one graph per decode batch size: the draft's extend and chain, the draft
    tokens written into the verify inputs, the target's verify forward (rows x (k + 1) tokens, every token's
    logits). Steady: every sequence verifies k = max_draft_len tokens and the draft catches up over at most
    k + 1 positions (all rounds but the first after a prompt and those a chunk end or max_tokens cuts short,
    which run the draft eagerly and replay the verify graph). One launch instead of k draft forwards
    (about 20 kernels each) and the verify graph."""

    def __init__(self, runner, proposer):
        self.runner, self.p, self.k = runner, proposer, proposer.k
        self.graphs: dict[int, tuple] = {}  # rows -> (run: replay -> (drafts, logits), staged inputs)
        self.pool = None

    def fits(self, seqs: list[StepSeq]) -> int | None:
        """The graph's batch size for this step, or None."""
        k = self.k
        if not all(s.draft_len == k and len(s.draft_tokens) <= k + 1 for s in seqs):
            return None
        return next((b for b in sorted(self.graphs) if b >= len(seqs)), None)

    def _batches(self, seqs: list[StepSeq], rows: int, out: dict | None = None) -> dict[str, ForwardBatch]:
        """The round's inputs built on the host, padded to `rows` sequences (CPU): the draft's extend and the
        verify. The chain steps' inputs are views of the verify's (_chain), so the host builds and uploads two
        batches a round whatever k is: at k = 3, batch 1, 128K tables, 0.42-0.57 ms of host time where k + 1
        batches took 0.75-1.4 (2-core CPU, alternated runs; maverick-bench host-batch measures it).
        out: {"extend": arrays, "verify": arrays} by field, the staging buffer's, filled in place."""
        r, k = self.runner, self.k
        out = out or {}
        steps = [StepSeq(s.seq_id, s.draft_tokens, s.draft_start, SeqBlocks(s.blocks.global_blocks, [])) for s in seqs]
        extend = build_forward_batch(steps, r.block_size, r.chunk, r.scratch_global, r.scratch_local, pad_batch=rows,
                                     pad_q=k + 1, pad_tokens=rows * (k + 1), pad_global_blocks=r.graph_blocks,
                                     out=out.get("extend"))
        return {"extend": extend.pad_logits(rows), "verify": r._padded(seqs, (rows, k + 1), out.get("verify"))}

    def stage(self, staged: Staged, seqs: list[StepSeq], rows: int) -> None:
        """Build the round's inputs straight into the graph's pinned staging buffer and upload it (no copy
        of each field into it: 21 fields a round)."""
        out: dict[str, dict] = {"extend": {}, "verify": {}}
        for key, a in staged.host_arrays().items():
            n, f = key.split(".", 1)
            out[n][f] = a
        # the extend reads the verify's table (SHARED_TABLE): its build fills that array, which the verify's then
        # refills with the same rows, instead of allocating a table (rows x 2048 at 128K) only to drop it
        f = SHARED_TABLE.split(".", 1)[1]
        out["extend"][f] = out["verify"][f]
        self._batches(seqs, rows, out)
        staged.upload()

    def _chain(self, verify: ForwardBatch, depth: int, ids: torch.Tensor, const: dict) -> ForwardBatch:
        """Chain step `depth`'s one-token batch, on the device: each row's token sits where its verify token
        depth - 1 does (the same position, the same KV slot, the same block table); padded rows as
        build_forward_batch pads them (position 0, q position -1, the scratch slot, index 0)."""
        rows, q = const["rows"].shape[0], self.k + 1
        pos = verify.positions.view(rows, q)[:, depth - 1].contiguous()
        qpos = verify.q_positions[:, depth - 1].contiguous()
        index = torch.where(qpos >= 0, const["rows"], 0)
        return ForwardBatch(input_ids=ids, positions=pos, q_index=index[:, None], q_positions=qpos[:, None],
                            token_to_padded=index, ctx_lens=pos, global_block_table=verify.global_block_table,
                            local_block_table=const["local_table"],
                            global_slots=verify.global_slots.view(rows, q)[:, depth - 1].contiguous(),
                            local_slots=const["local_slots"], logits_indices=index)

    def _prepare(self, rows: int):
        """Static inputs of a `rows` graph (staged, one int64 buffer) and the round's body over them."""
        r, k = self.runner, self.k
        protos = self._batches([], rows)
        shapes = {f"{n}.{f}": tuple(t.shape) for n, b in protos.items() for f, t in b.tensors().items()}
        del shapes[SHARED_TABLE]
        staged = Staged(shapes, torch.int64, r.device)
        self._write(staged, protos)
        views = {n: ForwardBatch(**{f: staged.views.get(f"{n}.{f}") for f in b.tensors()}) for n, b in protos.items()}
        views["extend"].global_block_table = views["verify"].global_block_table
        const = {"rows": torch.arange(rows, device=r.device),
                 "local_table": torch.zeros(rows, 1, dtype=torch.int64, device=r.device),
                 "local_slots": torch.full((rows,), r.scratch_local, dtype=torch.int64, device=r.device)}
        chain_ids = torch.zeros(max(k - 1, 1), rows, dtype=torch.int64, device=r.device)

        def body() -> tuple[torch.Tensor, ...]:
            chain = [self._chain(views["verify"], d, chain_ids[d - 1], const) for d in range(1, k)]
            drafts = self.p.full_chain(views["extend"], chain)
            views["verify"].input_ids.view(rows, k + 1)[:, 1:].copy_(drafts)
            logits = r.model(views["verify"], r.kv_caches)
            # greedy rows' acceptance inside the graph: no acceptance launches after a steady greedy round
            return drafts, logits, *accept_steady_greedy(logits, drafts)

        return staged, body

    def capture(self, batch_sizes: list[int]) -> None:
        r = self.runner
        for rows in sorted(batch_sizes, reverse=True):  # largest first: the smaller reuse its memory pool
            staged, body = self._prepare(rows)
            with torch.inference_mode():
                for _ in range(2):  # compile the Triton kernels and warm the allocator outside capture
                    body()
                torch.cuda.synchronize(r.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = body()
                self.pool = graph.pool()
            # body holds the graph's device inputs that live outside `staged` (the chain's constants and ids):
            # dropped, their memory went back to the allocator while the graph still read it (garbage token
            # ids and rows, out-of-bounds gathers in 3 of 4 runs on H100)
            self.graphs[rows] = (lambda g=graph, o=out, keep=body: (g.replay(), o)[1], staged)

    @staticmethod
    def _write(staged, batches: dict[str, ForwardBatch]) -> None:
        for n, b in batches.items():
            for f, t in b.tensors().items():
                if f"{n}.{f}" != SHARED_TABLE:
                    staged.write(f"{n}.{f}", t)
        staged.upload()

    def replay(self, seqs: list[StepSeq], rows: int) -> tuple[torch.Tensor, ...]:
        """On the device, valid until the next replay: draft tokens [rows, k], the logits of the step's rows,
        their argmax, and each sequence's accepted draft tokens by greedy acceptance."""
        run, staged = self.graphs[rows]
        self.stage(staged, seqs, rows)
        drafts, logits, greedy, accepted = run()
        n = sum(s.num_logits for s in seqs)
        return drafts, logits[:n], greedy[:n], accepted[:len(seqs)]
