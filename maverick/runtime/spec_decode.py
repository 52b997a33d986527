"""EAGLE-3 speculative decoding: draft K tokens as a linear chain, verify them in one target step.

A round for each sequence (committed tokens c[0..L-1]; the target's cache holds positions 0..L-2):
1. Draft extend: the draft runs over the positions whose target features it has not seen yet (the prompt
   after prefill, the accepted tokens after a verify), pairing the target's features at position p with the
   embedding of c[p+1]; its last output proposes d1.
2. Chain: K-1 more draft steps, one token each, on the draft's own output feature.
3. Verify: the target runs c[L-1], d1..dK (K+1 positions, logits and EAGLE-3 features for each). d(i+1) is
   accepted while it equals the target's argmax after d(i); the target's argmax after the last accepted one
   is a bonus token. Every output token is the target's own greedy choice, so the output is exactly
   decoding without a draft. Sampling (temperature > 0) uses the rejection rule for a deterministic draft:
   d(i+1) is accepted with probability p_i(d(i+1)) under the target's filtered distribution p_i; on a
   rejection the token is drawn from p_i without d(i+1), renormalized; after K acceptances the bonus token
   from p_K. Each output token is then distributed exactly as the target's sampler would draw it.
4. Roll back: the cache of rejected positions is simply written over later (the sequence's length decides
   what is read). A chunked (local) layer's ring slot of a rejected position held the position one chunk
   earlier, so the verify window never crosses a chunk boundary (K shrinks at the chunk's end): every
   rejected slot then held a position of the previous chunk, which no later query reads.

This loop runs steps eagerly on a ModelRunner's model and caches, outside the engine's scheduler; the
draft keeps its own cache in the same block tables as the target's global (NoPE) layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from maverick_plugins import dispatch

from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.sampler import SamplingTensors, sampling_probs
from maverick.models.eagle3 import Eagle3Draft

from .batch import build_forward_batch
from .kv_cache import SeqBlocks
from .model_runner import ModelRunner
from .staging import to_device
from .step import StepSeq


@dataclass
class _Seq:
    seq_id: int
    tokens: list[int]  # committed: the prompt, then every accepted or bonus token
    prompt_len: int
    pending_start: int = 0  # draft positions pending_start..len(tokens)-2 await the draft (features below)
    features: torch.Tensor | None = None  # [n, hidden] fused target features of those positions
    proposals: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclass
class SpecStats:
    """Acceptance: draft tokens proposed and accepted, verify rounds, tokens per round (the acceptance length)."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    tokens: int = 0
    per_request: list[float] = field(default_factory=list)

    @property
    def acceptance_length(self) -> float:
        return self.tokens / max(1, self.rounds)


class Eagle3Speculator:
    def __init__(self, runner: ModelRunner, draft: Eagle3Draft, max_draft_len: int):
        if not runner.kv.has_global:
            raise ValueError("EAGLE-3 keeps its cache in the global (NoPE) layers' block tables; this model has none")
        self.runner, self.draft, self.k = runner, draft, max_draft_len
        self.aux_layers = draft.cfg.aux_layer_ids
        shape = draft.kv_cache_shape(runner.kv.global_pool.num_blocks, runner.block_size)
        dtype = draft.fc.dtype
        self.draft_kv = (torch.zeros(shape, dtype=dtype, device=runner.device),
                         torch.zeros(shape, dtype=dtype, device=runner.device))
        self.propose = self._draft_chain  # (seqs, lengths) -> proposals per sequence; tests may replace it

    # --- steps ---------------------------------------------------------------------------------------

    def _batch(self, seqs: list[StepSeq], draft: bool) -> ForwardBatch:
        r = self.runner
        if draft:  # the draft's cache: the global block tables only
            seqs = [StepSeq(s.seq_id, s.tokens, s.start, SeqBlocks(s.blocks.global_blocks, []), s.num_logits)
                    for s in seqs]
        b = build_forward_batch(seqs, r.block_size, r.chunk, r.scratch_global, r.scratch_local)
        return ForwardBatch(**to_device(b.tensors(), r.device))

    @torch.inference_mode()
    def _target(self, seqs: list[StepSeq]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of every sequence's last num_logits tokens, and the fused draft features of every token."""
        with dispatch.use(self.runner.kernel_options):
            logits, aux = self.runner.model(self._batch(seqs, False), self.runner.kv_caches, self.aux_layers)
            return logits, self.draft.fuse(aux)

    @torch.inference_mode()
    def _draft_step(self, seqs: list[StepSeq], features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft forward: token ids [sequences] proposed from each sequence's last row, and every row's
        output feature [T, hidden]."""
        with dispatch.use(self.runner.kernel_options):
            batch = self._batch(seqs, True)
            out = self.draft(self.runner.model.embed(batch.input_ids), features, batch, self.draft_kv)
            ids = self.draft.target_ids(self.draft.logits(out[batch.logits_indices]).argmax(dim=-1))
        return ids, out

    def _draft_chain(self, seqs: list[_Seq], lengths: list[int]) -> list[list[int]]:
        """Each sequence's `lengths[i]` draft tokens: extend over its pending positions, then the chain."""
        active = [i for i, n in enumerate(lengths) if n > 0]
        out: list[list[int]] = [[] for _ in seqs]
        if not active:
            return out
        kv = self.runner.kv
        step = [StepSeq(seqs[i].seq_id, seqs[i].tokens[seqs[i].pending_start + 1:], seqs[i].pending_start,
                        kv.seqs[seqs[i].seq_id]) for i in active]
        ids, rows = self._draft_step(step, torch.cat([seqs[i].features for i in active]))
        last = torch.cumsum(torch.tensor([len(s.tokens) for s in step]), 0) - 1
        feats = rows[last.to(rows.device)]
        for j, i in enumerate(active):
            out[i].append(int(ids[j]))
        for depth in range(1, max(lengths)):
            more = [j for j, i in enumerate(active) if lengths[i] > depth]
            if not more:
                break
            step = [StepSeq(seqs[active[j]].seq_id, [out[active[j]][-1]], len(seqs[active[j]].tokens) - 2 + depth,
                            kv.seqs[seqs[active[j]].seq_id]) for j in more]
            ids, rows = self._draft_step(step, feats[more])
            feats = feats.clone()
            feats[more] = rows
            for j, t in zip(more, ids.tolist()):
                out[active[j]].append(t)
        return out

    @staticmethod
    def _accept(draft: list[int], logits: torch.Tensor, params: tuple, gen: torch.Generator) -> tuple[int, list[int]]:
        """(accepted draft tokens a, the tokens this round adds: draft[:a] and one from the target) for logits
        rows [len(draft) + 1, vocab], row i being the target's after draft[:i]."""
        temperature, top_k, top_p, min_p = params
        if temperature == 0 or top_k == 1:
            ys = logits.argmax(dim=-1).tolist()
            a = next((i for i, (x, y) in enumerate(zip(draft, ys)) if x != y), len(draft))
            return a, draft[:a] + [ys[a]]
        n = logits.shape[0]
        t = SamplingTensors(*(torch.full((n,), v, dtype=dt, device=logits.device) for v, dt in (
            (temperature, torch.float32), (top_k, torch.int64), (top_p, torch.float32), (min_p, torch.float32),
            (0, torch.int64), (0, torch.int64))))
        probs = sampling_probs(logits, t).double().cpu()
        for i, d in enumerate(draft):
            if torch.rand((), generator=gen, dtype=torch.float64) < probs[i, d]:
                continue
            rest = probs[i].clone()
            rest[d] = 0.0
            return i, draft[:i] + [int(torch.multinomial(rest / rest.sum(), 1, generator=gen))]
        return len(draft), draft + [int(torch.multinomial(probs[-1], 1, generator=gen))]

    # --- the loop ------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, seed: int = 0) -> tuple[list[list[int]], SpecStats]:
        """Continuations of `prompts` (max_new_tokens each, no stop tokens): greedy at temperature 0, else
        sampled with these filters (sequence i seeded with seed + i); and acceptance statistics."""
        r, kv, chunk = self.runner, self.runner.kv, self.runner.chunk
        seqs = [_Seq(-1000 - i, list(p), len(p)) for i, p in enumerate(prompts)]
        params = (temperature, top_k, top_p, min_p)
        gens = {s.seq_id: torch.Generator().manual_seed(seed + i) for i, s in enumerate(seqs)}
        try:
            for s in seqs:  # prefill: the prompt's cache, its first token and its features for the draft
                if len(s.tokens) + max_new_tokens + self.k > r.max_seq_len:
                    raise ValueError(f"prompt of {len(s.tokens)} tokens + {max_new_tokens} new + {self.k} draft "
                                     f"exceeds max_seq_len={r.max_seq_len}")
                step = StepSeq(s.seq_id, s.tokens, 0, kv.grow(s.seq_id, len(s.tokens)))
                logits, feats = self._target([step])
                s.tokens.append(self._accept([], logits[-1:], params, gens[s.seq_id])[1][0])
                s.features = feats
            live = list(seqs)
            while live:
                # draft lengths: K, shrunk to the chunk's end (the verify window stays in one chunk) and the budget
                lengths = [min(self.k, chunk - 1 - (len(s.tokens) - 1) % chunk, max_new_tokens - s.generated - 1)
                           for s in live]
                for s, n in zip(live, lengths):  # blocks for the verify window, which the draft's chain uses too
                    kv.grow(s.seq_id, len(s.tokens) + n)
                proposals = self.propose(live, lengths)
                steps = [StepSeq(s.seq_id, [s.tokens[-1], *d], len(s.tokens) - 1, kv.seqs[s.seq_id],
                                 num_logits=1 + len(d)) for s, d in zip(live, proposals)]
                logits, feats = self._target(steps)
                at = 0
                for s, d in zip(live, proposals):
                    a, new = self._accept(d, logits[at:at + 1 + len(d)], params, gens[s.seq_id])
                    start = len(s.tokens) - 1
                    s.tokens += new
                    s.pending_start, s.features = start, feats[at:at + a + 1]
                    s.proposals, s.accepted, s.rounds = s.proposals + len(d), s.accepted + a, s.rounds + 1
                    at += 1 + len(d)
                live = [s for s in live if s.generated < max_new_tokens]
        finally:
            for s in seqs:
                kv.free(s.seq_id)
        stats = SpecStats(sum(s.proposals for s in seqs), sum(s.accepted for s in seqs), sum(s.rounds for s in seqs),
                          sum(min(s.generated, max_new_tokens) - 1 for s in seqs),
                          [(min(s.generated, max_new_tokens) - 1) / max(1, s.rounds) for s in seqs])
        return [s.tokens[s.prompt_len:s.prompt_len + max_new_tokens] for s in seqs], stats
