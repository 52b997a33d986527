"""Owns one rank's model and KV pools; runs a step's ForwardBatch and returns logits."""
from __future__ import annotations

from typing import NamedTuple

import torch
from maverick_plugins import dispatch
from maverick_plugins.dispatch import KernelOptions

from maverick import distributed as dist
from maverick import envs
from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.sampler import SamplingRows, sample_tokens
from maverick.models import Llama4ForCausalLM

from .batch import build_forward_batch, ring_blocks
from .kv_cache import KVCacheManager, cdiv
from .speculative import accept
from .staging import take_fed_tokens, to_device
from .step import StepSeq


class StepOut(NamedTuple):
    logits: torch.Tensor  # fp32 [rows, vocab]
    tokens: torch.Tensor | None  # [rows] sampled (with sampling rows)
    accepted: torch.Tensor | None  # [sequences with logits] draft tokens accepted (with a draft)


class ModelRunner:
    def __init__(self, model: Llama4ForCausalLM, max_seq_len: int, max_batch_size: int, block_size: int,
                 kv_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 num_global_blocks: int | None = None, num_local_blocks: int | None = None,
                 kernel_options: KernelOptions | None = None):
        self.model, self.device = model, torch.device(device)
        # how the kernels run in every forward and capture of this runner (A/B: assign another)
        self.kernel_options = kernel_options or KernelOptions(pdl=envs.pdl())
        cfg = model.cfg
        self.block_size, self.chunk = block_size, cfg.attention_chunk_size
        self.max_seq_len = max_seq_len
        if num_global_blocks is None:
            num_global_blocks = max_batch_size * cdiv(max_seq_len, block_size)
        if num_local_blocks is None:
            num_local_blocks = max_batch_size * ring_blocks(max_seq_len, self.chunk, block_size)
        has_g, has_l = bool(cfg.nope_layer_ids), bool(cfg.rope_layer_ids)
        self.kv = KVCacheManager(num_global_blocks if has_g else 0, num_local_blocks if has_l else 0,
                                 block_size, self.chunk, has_g, has_l)
        dtype = kv_dtype or model.spec.dtype
        if model.spec.fp8_kv_cache:
            dtype = torch.float8_e4m3fn
        self.kv_caches = []
        for layer in model.layers:
            n = num_local_blocks if layer.uses_rope else num_global_blocks
            shape = model.kv_cache_shape(n, block_size)
            self.kv_caches.append((torch.zeros(shape, dtype=dtype, device=self.device),
                                   torch.zeros(shape, dtype=dtype, device=self.device)))
        self.scratch_global = num_global_blocks * block_size
        self.scratch_local = num_local_blocks * block_size
        self.graph_blocks = cdiv(max_seq_len, block_size)  # block-table width every graph is captured with
        self.graphs = None
        self.spec = None  # an Eagle3Proposer once a draft is attached
        self.rounds = None  # RoundGraphs (CUDA, with a draft): a steady speculative round in one graph
        if envs.persistent() and model.tails is None:  # before any capture: the graphs hold the chains
            model.use_persistent()

    def attach_draft(self, draft, max_draft_len: int) -> None:
        """Speculative decoding with this EAGLE-3 draft (before graphs are captured: the target's forward then
        also writes the draft's features)."""
        from .speculative import Eagle3Proposer

        if self.graphs is not None:
            raise RuntimeError("attach the draft before capturing CUDA graphs")
        self.spec = Eagle3Proposer(self, draft, max_draft_len)

    def capture_cuda_graphs(self, batch_sizes: list[int], prefill_tokens: list[int] = (),
                            progress: bool = False) -> None:
        """Capture decode steps (one new token per sequence) for these batch sizes, and one sequence's
        prefill chunk for these token counts (each padded up to the next; none above max_seq_len)."""
        from .cuda_graph import StepGraphs

        shapes = [(b, 1) for b in batch_sizes] + [(1, t) for t in prefill_tokens if 1 < t <= self.max_seq_len]
        verify_q = self.spec.k + 1 if self.spec is not None else 0  # with a draft: verify graphs too
        self.graphs = StepGraphs(self.model, self.kv_caches, shapes, self.device, verify_q)
        with dispatch.use(self.kernel_options):
            self.graphs.capture(lambda shape: self._padded([], shape), progress)
            if self.spec is not None:
                from .cuda_graph import RoundGraphs

                self.rounds = RoundGraphs(self, self.spec)
                self.rounds.capture(batch_sizes)

    @torch.inference_mode()
    def warmup(self, max_num_tokens: int) -> None:
        """Run two throwaway prefills (the largest chunk a step may hold, and one token fewer) so the
        Triton kernels compile now, not in the first request's time to first token (3.2 s of a 3.3 s
        TTFT on H100). Triton specializes integer arguments on divisibility by
        16, hence two lengths. With a draft, each prefill is followed by a speculative round, as a request's
        first: the draft's catch-up over the whole prompt and its chain, and the verify of k + 1 tokens
        (the first request after load waited 1.18 s for their compiles on H200, 22 ms without a draft).
        Collective under TP: every rank calls it."""
        n = max(2, min(max_num_tokens, self.max_seq_len - 1))
        for length in (n, n - 1):
            if not self.kv.can_grow(-1, length):
                return
            try:
                self.forward([StepSeq(-1, [0] * length, 0, self.kv.grow(-1, length))])
                if self.spec is not None:
                    self._warm_round(length)
            finally:
                self.kv.free(-1)
        if self.spec is not None:
            self._warm_draft_extends()

    def _warm_draft_extends(self) -> None:
        """The draft's eager extends at each size class its attention kernels specialize on (outside the
        round graphs: rounds that max_tokens or a chunk end cuts short, a prompt's first): every count of
        positions the decode attention kernel takes (its row tile follows them: 7 and 8 positions at 5 query
        heads a KV head fill 64 rows, which k + 1 = 4 never reach; the graphs hold only 1 and k+1), then
        prompt lengths at each prefill tile (16, 32, 64 rows), one a multiple of 16 and one not. Serving
        compiled the decode and merge kernels of 64 rows (7-8-token prompts) at k = 3 on H100 while only
        1..k+1 were warmed."""
        decode_max = dispatch.table(self.device).attention_max_new_tokens
        sizes = [*range(1, max(self.spec.k + 1, decode_max) + 1), 9, 16, 17, 32, 33, 64]
        for q in sorted(set(sizes)):
            if q >= self.max_seq_len or not self.kv.can_grow(-1, q + 1):
                continue
            try:
                seq = StepSeq(-1, [0], q, self.kv.grow(-1, q + 1), draft_len=1, draft_start=0, draft_tokens=[0] * q)
                self.spec.propose([seq])
            finally:
                self.kv.free(-1)

    def _warm_round(self, prompt: int) -> None:
        """The first speculative round after a `prompt`-token prefill (one sampled token, then k drafts,
        fewer at a chunk's end or max_seq_len, as the engine plans it); none if no draft token fits."""
        k = min(self.spec.k, self.chunk - 1 - prompt % self.chunk, self.max_seq_len - 1 - prompt)
        if k < 1 or not self.kv.can_grow(-1, prompt + 1 + k):
            return
        seq = StepSeq(-1, [0] * (k + 1), prompt, self.kv.grow(-1, prompt + 1 + k), num_logits=k + 1,
                      draft_len=k, draft_start=0, draft_tokens=[0] * prompt)
        self.step([seq], None)

    def release_graphs(self) -> None:
        """Free the captured graphs (before the TP group is torn down: NCCL keeps a communicator whose
        collectives live in a graph until the graph is destroyed, so destroy_process_group waited
        forever with the graphs alive: TP2 on 2xH100)."""
        import gc

        self.graphs = self.rounds = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _padded(self, seqs: list[StepSeq], shape: tuple[int, int], out: dict | None = None):
        """seqs as a batch of a graph's shape (rows sequences x q new tokens, rows * q tokens, full-width
        block tables, the graph's logits rows); out: arrays to fill in place (build_forward_batch)."""
        rows, q = shape
        batch = build_forward_batch(seqs, self.block_size, self.chunk, self.scratch_global, self.scratch_local,
                                    pad_batch=rows, pad_q=q, pad_global_blocks=self.graph_blocks,
                                    pad_local_blocks=ring_blocks(self.max_seq_len, self.chunk, self.block_size),
                                    pad_tokens=rows * q, out=out)
        return batch.pad_logits(rows if self.graphs is None else self.graphs.logits_rows(shape))

    def stage_graph(self, seqs: list[StepSeq], shape: tuple[int, int] | int):
        """The captured graph of `shape` ((rows, q); an int: a decode graph of that many rows) with seqs
        (padded) in its inputs, for timing replays."""
        return self.graphs.stage(self._padded(seqs, (shape, 1) if isinstance(shape, int) else shape))

    def _graphable(self, seqs: list[StepSeq]) -> tuple[int, int] | None:
        if self.graphs is None:
            return None
        return self.graphs.shape_for([len(s.tokens) for s in seqs], [s.num_logits for s in seqs])

    def _graph_parts(self, seqs: list[StepSeq]) -> list[tuple[list[int], tuple[int, int]]] | None:
        if self.graphs is None:
            return None
        return self.graphs.parts_for([len(s.tokens) for s in seqs], [s.num_logits for s in seqs])

    def _step_parts(self, seqs: list[StepSeq], parts: list[tuple[list[int], tuple[int, int]]],
                    rows: SamplingRows | None, feed: torch.Tensor | None,
                    feed_src: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """step() of seqs as one graph replay per part (indices into seqs, graph shape); the logits (and
        tokens) in seqs' order."""
        first_row, first_tok, n, t = [], [], 0, 0  # each sequence's first logits row and token
        for s in seqs:
            first_row.append(n)
            first_tok.append(t)
            n, t = n + s.num_logits, t + len(s.tokens)
        pieces = {}
        for part, shape in parts:
            sub = [seqs[i] for i in part]
            sub_rows = None if rows is None else rows.take(
                [first_row[i] + j for i in part for j in range(seqs[i].num_logits)])
            src = None
            if feed_src is not None:
                src = _pad_src([x for i in part for x in feed_src[first_tok[i]:first_tok[i] + len(seqs[i].tokens)]],
                               shape[0] * shape[1])
            logits, tokens = self.graphs.replay(self._padded(sub, shape), sub_rows, sum(s.num_logits for s in sub),
                                                feed, src)
            # copied before the next replay: the graphs share one memory pool, so this graph's outputs may sit
            # where another keeps its intermediates (sampled tokens read back as garbage ids otherwise)
            logits, tokens = logits.clone(), None if tokens is None else tokens.clone()
            at = 0
            for i in part:
                k = seqs[i].num_logits
                pieces[i] = (logits[at:at + k], None if tokens is None else tokens[at:at + k])
                at += k
        ordered = [pieces[i] for i in range(len(seqs))]
        logits = torch.cat([lg for lg, _ in ordered])
        return logits, None if rows is None else torch.cat([t for _, t in ordered])

    def forward(self, seqs: list[StepSeq]) -> torch.Tensor:
        """fp32 logits [sum of num_logits, vocab] for the step (KV written for every token)."""
        return self.step(seqs, None).logits

    @torch.inference_mode()
    def step(self, seqs: list[StepSeq], rows: SamplingRows | None, feed: torch.Tensor | None = None) -> StepOut:
        """Logits as `forward`, and with `rows` (one per logits row) the sampled tokens [rows] on the
        device. feed: the previous step's tokens on the device, for seqs whose feed_row is set (their
        last token is taken from it). With a draft attached, sequences with a draft_len verify that many
        draft tokens (the draft proposes them first, on the device) and `accepted` counts them. Nothing here
        waits for the GPU; the caller's read of the tokens does."""
        n = sum(s.num_logits for s in seqs)
        if rows is not None and len(rows) != n:
            raise ValueError(f"sampling rows: got {len(rows)}, expected one per logits row ({n})")
        fed = any(s.feed_row >= 0 for s in seqs)
        if fed and feed is None:
            raise ValueError("a sequence's feed_row is set but no previous tokens were given (feed)")
        spec = [s for s in seqs if s.draft_len > 0]
        if spec and self.spec is None:
            raise ValueError("a sequence has a draft_len but no draft is attached")
        if spec and fed:
            raise ValueError("draft verification and fed tokens in one step (the overlap scheduler is off with a draft)")
        with dispatch.use(self.kernel_options):
            if self.spec is None:
                out = StepOut(*self._run(seqs, rows, feed, _feed_index(seqs, 0) if fed else None), None)
            else:
                rows_of_graph = self.rounds.fits(seqs) if self.rounds is not None and spec else None
                t = None if rows is None or rows.greedy else rows.to_tensors(self.device)
                if rows_of_graph is not None and self.spec.propose == self.spec._draft_chain:
                    drafts, logits, tokens, accepted = self.rounds.replay(seqs, rows_of_graph)
                    # greedy rows were accepted in the graph; sampled ones take the rejection rule here
                    out = StepOut(logits, tokens, accepted) if t is None else \
                        StepOut(logits, *accept(logits, seqs, drafts, t, self.spec.k))
                else:
                    drafts = self.spec.propose(spec) if spec else None
                    logits, _ = self._run(seqs, None, drafts.reshape(-1) if spec else None,
                                          _draft_index(seqs, self.spec.k) if spec else None)
                    out = StepOut(logits, *accept(logits, seqs, drafts, t, self.spec.k))
        dist.poll_peer_all_reduce()  # a fused all-reduce that timed out becomes an error, never a hang
        return out

    def _run(self, seqs: list[StepSeq], rows: SamplingRows | None, feed: torch.Tensor | None,
             feed_src: list[int] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """feed_src (with feed): per token of the unpadded step, the row of feed it takes, or -1."""
        n = sum(s.num_logits for s in seqs)
        shape = self._graphable(seqs)
        parts = None if shape is not None else self._graph_parts(seqs)
        fed = feed_src is not None
        if shape is not None:  # replay the captured graphs of the next shape up (decode, or one prompt chunk)
            src = _pad_src(feed_src, shape[0] * shape[1]) if fed else None
            batch = self._padded(seqs, shape, self.graphs.host_arrays(shape))
            logits, tokens = self.graphs.replay(batch, rows, n, feed, src)
        elif parts is not None:  # prompt chunks beside decode rows: a few replays instead of one eager step
            logits, tokens = self._step_parts(seqs, parts, rows, feed, feed_src)
        else:
            batch = build_forward_batch(seqs, self.block_size, self.chunk, self.scratch_global, self.scratch_local)
            inputs = batch.tensors()
            if fed:
                inputs["feed_src"] = torch.tensor(feed_src, dtype=torch.long)
            inputs = to_device(inputs, self.device)
            if fed:
                take_fed_tokens(inputs["input_ids"], inputs.pop("feed_src"), feed)
            logits = self.model(ForwardBatch(**inputs), self.kv_caches)
            tokens = None
            if rows is not None:
                tokens = sample_tokens(logits, None if rows.greedy else rows.to_tensors(self.device))
        return logits, tokens


def _feed_index(seqs: list[StepSeq], num_tokens: int) -> list[int]:
    """Per token of the step (at least num_tokens, padding -1): the row of the previous step's tokens it
    takes, or -1 (host token)."""
    src, t = [-1] * max(num_tokens, sum(len(s.tokens) for s in seqs)), 0
    for s in seqs:
        t += len(s.tokens)
        if s.feed_row >= 0:
            src[t - 1] = s.feed_row
    return src


def _draft_index(seqs: list[StepSeq], k: int) -> list[int]:
    """Per token of the step: the entry of the flattened draft tokens [verified sequences, k] it takes, or -1."""
    src, j = [], 0
    for s in seqs:
        src += [-1] * len(s.tokens)
        if s.draft_len:
            src[len(src) - s.draft_len:] = range(j * k, j * k + s.draft_len)
            j += 1
    return src


def _pad_src(src: list[int], num_tokens: int) -> list[int]:
    return src + [-1] * (num_tokens - len(src))

