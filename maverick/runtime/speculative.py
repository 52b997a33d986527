"""EAGLE-3 speculative decoding inside the engine's step; every rank runs it the same way.

A request's round (committed tokens c[0..L-1]; the target's cache holds positions 0..L-2, the draft's
cache positions before `draft_start`):
1. Draft extend: the draft runs over positions draft_start..L-2, pairing the target's features at position p
   with the embedding of c[p+1]; its last row proposes d1.
2. Chain: k-1 more draft steps, one token each, on the draft's own output feature (positions L-1..L+k-3).
3. Verify: the target runs c[L-1], d1..dk (positions L-1..L+k-1) in the step's one forward, with every other
   request's rows; the draft tokens go into its inputs on the device (no host round trip).
4. Accept, on the device: d(i+1) is accepted while it equals the target's argmax after d(i); the argmax
   after the last accepted one is a bonus token, so every output token is the target's own greedy choice.
   Sampled rows use the rejection rule for a deterministic draft: d(i+1) is accepted with probability
   p_i(d(i+1)) under the target's filtered distribution p_i; on a rejection the token is drawn from p_i
   without d(i+1), renormalized; after k acceptances the bonus token comes from p_k. Each output token is
   then distributed exactly as the plain sampler would draw it. The noise is counter-based like the plain
   sampler's (seed, token index), so a request's tokens do not depend on what shares its batch.
5. Roll back: the caches of rejected positions are written over later (the sequence's length decides what
   is read). A chunked (local) layer's ring slot of a rejected position held the position one chunk earlier,
   so the engine keeps the verify window inside one chunk (k shrinks at the chunk's end): every overwritten
   slot then held a position of the previous chunk, which no later query reads.

Features: the target writes the fused features (fc over its hidden states at the aux layers) of every
token it runs into a cache laid out like a global layer's KV pool (row = the token's global KV slot), so
they live and die with the sequence's blocks, need no per-request state, and the draft gathers them by slot.
The draft's own KV lives in the same block tables (the global ones).
"""
from __future__ import annotations

import functools

import torch

from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.sampler import SamplingTensors, acceptance_noise, sampling_probs, uniform_noise
from maverick.models.eagle3 import Eagle3Draft

from .batch import build_forward_batch
from .kv_cache import SeqBlocks
from .staging import to_device
from .step import StepSeq


class FeatureSink:
    """What the target writes while it runs: the fused EAGLE-3 features of every token, by global KV slot."""

    def __init__(self, draft: Eagle3Draft, rows: int, device: torch.device):
        self.layers, self.fuse = draft.cfg.aux_layer_ids, draft.fuse
        self.cache = torch.zeros(rows, draft.cfg.hidden_size, dtype=draft.dtype, device=device)

    def write(self, aux: torch.Tensor, slots: torch.Tensor) -> None:
        """aux [T, len(layers) * hidden]: the residual stream after each aux layer (padding tokens go to scratch)."""
        self.cache.index_copy_(0, slots, self.fuse(aux))


class Eagle3Proposer:
    """One rank's draft: its weights (replicated), KV pool, and the feature cache the target fills."""

    def __init__(self, runner, draft: Eagle3Draft, max_draft_len: int):
        if not runner.kv.has_global:
            raise ValueError("EAGLE-3 keeps its cache in the global (NoPE) layers' block tables; this model has none")
        if max_draft_len < 1:
            raise ValueError(f"max_draft_len={max_draft_len}: expected at least 1")
        self.runner, self.draft, self.k = runner, draft, max_draft_len
        blocks = runner.kv.global_pool.num_blocks
        shape = draft.kv_cache_shape(blocks, runner.block_size)
        self.kv = (torch.zeros(shape, dtype=draft.dtype, device=runner.device),
                   torch.zeros(shape, dtype=draft.dtype, device=runner.device))
        self.sink = FeatureSink(draft, (blocks + 1) * runner.block_size, runner.device)
        runner.model.feature_sink = self.sink
        self.propose = self._draft_chain  # (the step's sequences) -> [n, k] target ids; tests may replace it

    def _batch(self, seqs: list[StepSeq]) -> ForwardBatch:
        r = self.runner
        seqs = [StepSeq(s.seq_id, s.tokens, s.start, SeqBlocks(s.blocks.global_blocks, [])) for s in seqs]
        # block tables as wide as the graphs' (max_seq_len): the attention kernels specialize on the width
        # and on the split count that follows from it (== 1, divisible by 16), so a table as wide as the
        # longest sequence made a compile of new shapes while serving
        b = build_forward_batch(seqs, r.block_size, r.chunk, r.scratch_global, r.scratch_local,
                                pad_global_blocks=r.graph_blocks)
        return ForwardBatch(**to_device(b.tensors(), r.device))

    def _run(self, batch: ForwardBatch, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target ids proposed from each sequence's last row, every row's output feature)."""
        d = self.draft
        out = d(self.runner.model.embed(batch.input_ids), h, batch, self.kv)
        return d.propose(out[batch.logits_indices]), out

    def _draft_chain(self, seqs: list[StepSeq]) -> torch.Tensor:
        """Draft tokens [n, k] (target ids, on the device; row j holds seqs[j].draft_len of them) for the
        step's sequences with a draft_len, in order."""
        dev = self.runner.device
        out = torch.zeros(len(seqs), self.k, dtype=torch.long, device=dev)
        extend = self._batch([StepSeq(s.seq_id, s.draft_tokens, s.draft_start, s.blocks) for s in seqs])
        ids, rows = self._run(extend, self.sink.cache[extend.global_slots])
        out[:, 0] = ids
        feats = rows[extend.logits_indices]  # each sequence's last output feature: the chain's input
        for depth in range(1, max(s.draft_len for s in seqs)):
            more = [j for j, s in enumerate(seqs) if s.draft_len > depth]
            batch = self._batch([StepSeq(seqs[j].seq_id, [0], seqs[j].start + depth - 1, seqs[j].blocks)
                                 for j in more])
            if len(more) == len(seqs):  # every row goes on (the usual case): no gather
                batch.input_ids = out[:, depth - 1]
                out[:, depth], feats = self._run(batch, feats)
                continue
            idx = to_device({"idx": torch.tensor(more)}, dev)["idx"]  # pinned copy: no stream sync
            batch.input_ids = out[idx, depth - 1]
            ids, rows = self._run(batch, feats[idx])
            out[idx, depth] = ids
            feats = feats.index_copy(0, idx, rows)
        return out

    def full_chain(self, extend: ForwardBatch, chain: list[ForwardBatch]) -> torch.Tensor:
        """Draft tokens [rows, k] when every row drafts k (a round graph's body): the extend batch, then the
        k - 1 one-token batches (their input ids are filled here, from the previous depth's proposals)."""
        ids, rows = self._run(extend, self.sink.cache[extend.global_slots])
        feats, out = rows[extend.logits_indices], [ids]
        for batch in chain:
            batch.input_ids.copy_(out[-1])
            ids, feats = self._run(batch, feats)
            out.append(ids)
        return torch.stack(out, dim=1)


@functools.lru_cache(maxsize=256)
def _acceptance_layout(rows: tuple[tuple[int, int], ...], k: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(per logits row: the draft token it checks, an index into the flattened drafts, or -1; per sequence with
    logits: its k rows, -1 past its draft_len) for a step's (num_logits, draft_len) of each sequence, on the
    device. Steady rounds repeat the same layout step after step: built and copied once, then reused."""
    src, segs, j = [], [], 0
    for num_logits, draft_len in rows:
        if num_logits == 0:
            continue
        if draft_len:
            segs.append([len(src) + i for i in range(draft_len)] + [-1] * (k - draft_len))
            src += [j * k + i for i in range(draft_len)] + [-1]
            j += 1
        else:
            segs.append([-1] * k)
            src.append(-1)
    host = to_device({"src": torch.tensor(src, dtype=torch.long),
                      "segs": torch.tensor(segs, dtype=torch.long).reshape(len(segs), k)}, dev)
    return host["src"], host["segs"]


def accept_steady_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """accept() for a steady round of greedy rows, every one verifying its k drafts (logits [rows * (k + 1),
    vocab], drafts [rows, k]): fixed shapes and no host layout, so a round graph runs it inside."""
    rows, k = drafts.shape
    greedy = logits.argmax(dim=-1)
    return greedy, _leading_run(drafts == greedy.view(rows, k + 1)[:, :k])


def _leading_run(checks: torch.Tensor) -> torch.Tensor:
    """Per row of checks [rows, k] (bool): how many lead before the first False (the accepted drafts)."""
    return checks.long().cumprod(dim=1).sum(dim=1)


def accept(logits: torch.Tensor, seqs: list[StepSeq], drafts: torch.Tensor | None, t: SamplingTensors | None,
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 above for a step's logits rows: the output tokens [rows] (row i of a verified sequence: its i-th
    output token, valid up to its accepted count) and the accepted draft tokens of each sequence with logits
    [sequences], on the device. drafts [verified sequences, k] (their draft_len first of each row); t: the
    sampling parameters of each row (None: every row greedy)."""
    src, segs = _acceptance_layout(tuple((s.num_logits, s.draft_len) for s in seqs), k, logits.device)
    flat = drafts.reshape(-1) if drafts is not None else torch.zeros(1, dtype=torch.long, device=logits.device)
    dtok = torch.where(src >= 0, flat[src.clamp(min=0)], -1)
    greedy = logits.argmax(dim=-1)
    if t is None:
        ok, out = dtok == greedy, greedy
    else:
        probs = sampling_probs(logits, t)
        d = dtok.clamp(min=0)[:, None]
        has = (dtok >= 0)[:, None]
        ok_sampled = (dtok >= 0) & (acceptance_noise(t.seeds, t.offsets) < probs.gather(1, d)[:, 0])
        residual = torch.where(has, probs.scatter(1, d, 0.0), probs)
        gumbel = -torch.log(-torch.log(uniform_noise(t.seeds, t.offsets, logits.shape[1])))
        resampled = (torch.log(residual) + gumbel).argmax(dim=-1)
        is_greedy = (t.temperature == 0) | (t.top_k == 1)
        ok = torch.where(is_greedy, dtok == greedy, ok_sampled)
        out = torch.where(is_greedy, greedy, torch.where(ok_sampled, dtok, resampled))
    return out, _leading_run(ok[segs.clamp(min=0)] & (segs >= 0))

