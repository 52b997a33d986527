"""The step loop on rank 0: admit requests, schedule, run the model on every rank, sample, stop."""
from __future__ import annotations

import dataclasses
import random
from typing import Callable

import torch

from maverick.layers.sampler import SamplingRows, logprobs

from .errors import EngineDead, StepError, is_fatal_error
from .model_runner import ModelRunner
from .request import Request, Status, TokenizedPrompt, detokenize_step
from .sampling_params import InvalidRequest, SamplingParams
from .scheduler import Scheduler
from .step import Scheduled, StepSeq


class EngineCore:
    """overlap: queue the next decode step before reading this one's tokens (see Launched below); the
    tokens are the same either way. before_step(plan, rows): rank 0 sends each step to the other ranks."""

    def __init__(self, runner: ModelRunner, tokenizer, max_batch_size: int, max_num_tokens: int,
                 before_step: Callable[[list[StepSeq], SamplingRows | None], None] | None = None,
                 overlap: bool = True, capacity_scheduler_policy: str = "MAX_UTILIZATION"):
        self.runner, self.tokenizer = runner, tokenizer
        # speculative decoding (an EAGLE-3 draft attached to the runner): decode rows verify up to spec_k draft
        # tokens a step. The next step's plan depends on how many were accepted, so nothing is queued ahead.
        self.spec_k = runner.spec.k if runner.spec is not None else 0
        self.spec_stats = SpecStats()
        self.overlap = overlap and not self.spec_k
        self._in_flight: Launched | None = None
        self.overlapped = 0  # steps queued before the previous step's tokens were read
        self.cfg = runner.model.cfg
        self.max_seq_len = runner.max_seq_len
        self.scheduler = Scheduler(runner.kv, max_batch_size, max_num_tokens, capacity_scheduler_policy,
                                   self.max_seq_len)
        self.requests: dict[int, Request] = {}
        self.collective = before_step is not None  # other ranks run every step too
        self.before_step = before_step or (lambda plan, rows: None)
        self.failed: str | None = None  # set once a step failed in a way the engine cannot recover from
        self._touched: list[Request] = []
        self._draft_budget = 0
        self._collective_started = False
        self._next_id = 0
        self.steps = 0
        eos = set(self.cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)

    # ---- requests --------------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | TokenizedPrompt) -> TokenizedPrompt:
        """Validate and tokenize a prompt. Reads no engine state that steps change, so a server runs it
        on another thread: a long prompt's tokenization never stalls the step loop."""
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt: empty string; expected at least one token")
            if self.tokenizer is None:
                raise InvalidRequest("prompt: text given but the engine has no tokenizer; pass token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") has no UTF-8 form to tokenize
                raise InvalidRequest(f"prompt: not valid Unicode text at character {e.start} "
                                     f"({prompt[e.start]!r}); expected UTF-8-encodable text") from None
            return TokenizedPrompt(self.tokenizer.encode(prompt), prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt: token id {bad[0]} out of range; expected ids in [0, {self.cfg.vocab_size})")
            return TokenizedPrompt(ids, None)
        raise InvalidRequest(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")

    def add_request(self, prompt: str | list[int] | TokenizedPrompt, params: SamplingParams) -> Request:
        if self.failed is not None:
            raise EngineDead(f"the engine stopped after an unrecoverable error: {self.failed}")
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        p = self.encode(prompt)
        ids = p.ids
        if not ids:
            raise InvalidRequest("prompt: empty; expected at least one token")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequest(f"prompt: {len(ids)} tokens; the engine's max_seq_len is {self.max_seq_len}, so "
                                 f"prompts may have at most {self.max_seq_len - 1}")
        kv = self.runner.kv
        g, loc = kv.blocks_needed(len(ids) + 1)
        if g > kv.global_pool.num_blocks or loc > kv.local_pool.num_blocks:
            raise InvalidRequest(f"prompt: {len(ids)} tokens need {g} KV blocks; the pool has "
                                 f"{kv.global_pool.num_blocks}")
        if params.top_k >= self.cfg.vocab_size:  # keeps every token: the same as off, and fits the int64 row
            params = dataclasses.replace(params, top_k=0)
        seed = params.seed if params.seed is not None else random.getrandbits(64)
        req = Request(self._next_id, p.text, ids, params, seed, self.eos_ids, arrival_step=self.steps)
        self._next_id += 1
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: int) -> None:
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            req.finish("abort")
            self._retire(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def _retire(self, req: Request) -> None:
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one forward over the scheduled tokens; returns the requests whose tokens were read.

        With overlap, a step queues the next decode step (fed from this one's tokens on the GPU) before
        it reads this one's tokens; a request that stops meanwhile wastes one row, never a token.

        Raises StepError if the step fails: the requests it held are finished with reason "error" and their
        KV freed; the others keep their state and the next step serves them, unless the error is fatal."""
        if self.failed is not None:
            raise EngineDead(f"the engine stopped after an unrecoverable error: {self.failed}")
        self._touched = []  # every request this step holds: the ones a failure ends
        self._collective_started = False
        try:
            return self._step()
        except Exception as e:
            raise self._fail_step(e) from e

    def _step(self) -> list[Request]:
        if self._in_flight is None:
            sched = self.scheduler.schedule()
            if not sched:
                if self.scheduler.has_work():
                    raise RuntimeError("scheduler made no progress: the KV pool cannot hold any waiting request")
                return []
            self._touched += [s.request for s in sched]
            # draft tokens count against max_num_tokens like TensorRT-LLM's: what the scheduled tokens leave
            self._draft_budget = self.scheduler.max_num_tokens - sum(s.num_new for s in sched)
            plan = [self._plan(s) for s in sched]
            self._in_flight = self._launch(sched, plan, [s.request for s in sched if s.completes], pending=0,
                                           counts=[p.num_logits for p in plan if p.num_logits])
        prev, self._in_flight = self._in_flight, None
        self._touched += [s.request for s in prev.sched]
        if self.overlap:
            self._in_flight = self._continue(prev)
        return self._read(prev)

    def _plan(self, s: Scheduled) -> StepSeq:
        r = s.request
        tokens = r.token_ids(r.num_computed, r.num_computed + s.num_new)
        seq = StepSeq(r.request_id, tokens, r.num_computed, self.runner.kv.seqs[r.request_id],
                      num_logits=1 if s.completes else 0)
        k = self._draft_len(s)
        if k:  # verify k draft tokens after the last committed one; the draft first catches up from draft_start
            seq.tokens, seq.num_logits, seq.draft_len = tokens + [0] * k, k + 1, k
            seq.draft_start, seq.draft_tokens = r.draft_start, r.token_ids(r.draft_start + 1, r.num_tokens)
            r.draft_start = r.num_computed
        return seq

    def _draft_len(self, s: Scheduled) -> int:
        """Draft tokens a decode row verifies this step: spec_k, fewer at the end of an attention chunk (the
        verify window stays in one chunk, see speculative.py), of max_tokens, of max_seq_len and of the step's
        token budget left; 0 if the KV pool cannot hold them (the row then decodes one token as usual)."""
        r = s.request
        if not self.spec_k or not r.output_token_ids or s.num_new != 1 or not s.completes:
            return 0
        start = r.num_computed  # the last committed token's position
        k = min(self.spec_k, self.runner.chunk - 1 - start % self.runner.chunk,
                r.params.max_tokens - len(r.output_token_ids) - 1, self.max_seq_len - r.num_tokens,
                self._draft_budget)
        kv = self.runner.kv
        if k <= 0 or not kv.can_grow(r.request_id, r.num_tokens + k):
            return 0
        kv.grow(r.request_id, r.num_tokens + k)
        self._draft_budget -= k
        return k

    def _fail_step(self, e: Exception) -> "StepError":
        """Finish every request the failed step held (reason "error", KV freed) and drop the queued step.
        Fatal when the other ranks may be inside this step's collectives (their state and rank 0's now
        differ), when a rank died, or on a device error (the CUDA context is lost): then the engine refuses
        all further work."""
        if self._in_flight is not None:
            self._touched += [s.request for s in self._in_flight.sched]
            self._in_flight = None
        failed = []
        for r in dict.fromkeys(self._touched):  # in order, once each
            if not r.finished:
                r.finish("error", f"{type(e).__name__}: {e}")
                self._retire(r)
                failed.append(r)
        fatal = (self._collective_started and self.collective) or is_fatal_error(e)
        if fatal:
            self.failed = f"{type(e).__name__}: {e}"
        return StepError(f"step failed ({type(e).__name__}: {e}); {len(failed)} request(s) ended with an error"
                         + ("; the engine cannot continue" if fatal else ""), failed, fatal)

    def _launch(self, sched: list[Scheduled], plan: list[StepSeq], sampled: list[Request], pending: int,
                feed: torch.Tensor | None = None, counts: list[int] | None = None) -> Launched:
        """counts: logits rows per sampled request (default one each)."""
        counts = counts or [1] * len(sampled)
        rows = SamplingRows.of(sampled, pending, counts) if sampled else None  # in the order of the logits rows
        self._collective_started = True
        self.before_step(plan, rows)
        out = self.runner.step(plan, rows, feed)
        self.steps += 1
        for s in sched:
            s.request.num_computed += s.num_new
        return Launched.queue(sched, sampled, out.logits, out.tokens, counts, out.accepted)

    def _continue(self, prev: Launched) -> Launched | None:
        """Queue the decode step that follows `prev` for all its requests, before prev's tokens are read:
        only in steady decode (no prefill chunk, nobody admissible waiting, no stop by length due, KV
        for one more token each); otherwise None and the next step is scheduled after the read."""
        reqs = [r for r in prev.sampled if not r.finished]
        sch = self.scheduler
        if (not reqs or len(reqs) != len(prev.sched) or len(reqs) > sch.max_num_tokens
                or (sch.waiting and len(sch.running) < sch.max_batch_size)):
            return None
        kv = self.runner.kv
        if any(r.num_computed != r.num_tokens or len(r.output_token_ids) + 1 >= r.params.max_tokens
               or r.num_tokens + 1 >= self.max_seq_len for r in reqs):
            return None
        if not kv.can_grow_all({r.request_id: r.num_tokens + 1 for r in reqs}):
            return None
        self.overlapped += 1
        row = {id(r): i for i, r in enumerate(prev.sampled)}
        # the token fed at position num_tokens is prev's sample of that row, still on the GPU
        plan = [StepSeq(r.request_id, [0], r.num_tokens, kv.grow(r.request_id, r.num_tokens + 1),
                        feed_row=row[id(r)]) for r in reqs]
        return self._launch([Scheduled(r, 1) for r in reqs], plan, reqs, pending=1, feed=prev.tokens)

    def _read(self, launched: Launched) -> list[Request]:
        """Wait for a launched step's tokens and append them (rows of finished requests are dropped)."""
        if launched.tokens is None:
            return [s.request for s in launched.sched]
        done_before = {id(r) for r in launched.sampled if r.finished}  # stopped after this step was queued
        tokens, lp, accepted = launched.results()
        row = 0
        for j, (n, r) in enumerate(zip(launched.counts, launched.sampled)):
            first, row = row, row + n
            if id(r) in done_before:
                continue
            a = accepted[j] if accepted is not None else 0
            if n > 1:
                self.spec_stats.add(n - 1, a)
                r.num_computed += a  # the accepted draft tokens' KV is the target's own; the rest is written over
            for i in range(first, first + a + 1):  # stops at a stop token or string like plain decoding
                entry = None
                if r.params.logprobs is not None:
                    entry = {tokens[i]: lp[0][i]}
                    for tid, v in zip(lp[2][i][: r.params.logprobs], lp[1][i][: r.params.logprobs]):
                        entry.setdefault(tid, v)
                self._append(r, tokens[i], entry)
                if r.finished:
                    break
        return [s.request for s in launched.sched if id(s.request) not in done_before]

    def _append(self, r: Request, token: int, lp: dict[int, float] | None) -> None:
        r.output_token_ids.append(token)
        if lp is not None:
            r.output_logprobs.append(lp)
        p = r.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in r.eos_token_ids):
            r.finish("stop", token)
        if self.tokenizer is not None:
            prev = len(r.text)
            new, r.prefix_offset, r.read_offset = detokenize_step(
                self.tokenizer, r.output_token_ids, r.prefix_offset, r.read_offset, p.skip_special_tokens)
            r.text += new
            if p.stop and r.status is not Status.FINISHED:
                start = max(0, prev - max(len(s) for s in p.stop))
                hits = [(r.text.find(s, start), s) for s in p.stop if r.text.find(s, start) >= 0]
                if hits:
                    at, s = min(hits)
                    r.text = r.text[:at]
                    r.finish("stop", s)
        if r.status is not Status.FINISHED:
            if len(r.output_token_ids) >= p.max_tokens or r.num_tokens >= self.max_seq_len:
                r.finish("length")
        if r.finished:
            self._retire(r)


@dataclasses.dataclass
class Launched:
    """A step whose GPU work is queued but whose sampled tokens the host has not read yet. The overlap
    scheduler (EngineCore, on by default like TensorRT-LLM's) queues step n+1 before it reads step n's
    tokens, so the host's scheduling, input building and graph launch (0.13 ms at batch 1, 1.3 ms at batch
    64 on H200) run while the GPU computes. What the host will read is copied to pinned memory right after
    the step is queued, before step n+1 can overwrite the graphs' static outputs."""

    sched: list[Scheduled]  # what ran
    sampled: list[Request]  # the requests with rows of tokens, in order
    counts: list[int]  # rows of tokens per sampled request (a verified draft of k tokens: k + 1)
    tokens: torch.Tensor  # [rows] on the device: feeds the next step without a host round trip
    host: list[torch.Tensor]  # tokens, accepted draft tokens (with a draft), logprobs (chosen, top values, top ids)
    done: torch.cuda.Event | None
    speculative: bool = False

    @classmethod
    def queue(cls, sched: list[Scheduled], sampled: list[Request], logits: torch.Tensor, tokens: torch.Tensor | None,
              counts: list[int], accepted: torch.Tensor | None = None) -> "Launched":
        spec = accepted is not None
        if tokens is None:
            return cls(sched, sampled, counts, tokens, [], None, spec)
        want = [r.params.logprobs for r in sampled if r.params.logprobs is not None]
        out = [tokens] + ([accepted] if spec else []) + (list(logprobs(logits, tokens, max(want))) if want else [])
        if tokens.device.type != "cuda":
            return cls(sched, sampled, counts, tokens, out, None, spec)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in out]
        for h, t in zip(host, out):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(sched, sampled, counts, tokens, host, done, spec)

    def results(self) -> tuple[list[int], list | None, list[int] | None]:
        """Token ids per row, [chosen, top values, top ids] logprob lists if any row asked, and accepted draft
        tokens per sampled request with a draft (waits)."""
        if self.done is not None:
            self.done.synchronize()
        lists = [t.tolist() for t in self.host]
        accepted = lists.pop(1) if self.speculative else None
        return lists[0], (lists[1:] or None), accepted


@dataclasses.dataclass
class SpecStats:
    """Speculative decoding so far: verify rounds, draft tokens proposed and accepted. The acceptance length
    (tokens a round yields, the bonus token included) is what EAGLE-3 papers and NVIDIA's figures quote."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    def add(self, proposed: int, accepted: int) -> None:
        self.rounds, self.proposed, self.accepted = self.rounds + 1, self.proposed + proposed, self.accepted + accepted

    @property
    def acceptance_length(self) -> float:
        return 1 + self.accepted / max(1, self.rounds)
