"""The step loop on rank 0: admit requests, schedule, run the model on every rank, sample, stop."""
from __future__ import annotations

import random
from typing import Callable

import torch

from maverick.layers.sampler import logprobs

from .batch import StepSeq
from .detokenizer import detokenize_step
from .model_runner import ModelRunner
from .request import Request, Status
from .sampling_params import InvalidRequest, SamplingParams
from .sampling_rows import SamplingRows
from .scheduler import Scheduler


class EngineCore:
    def __init__(self, runner: ModelRunner, tokenizer, max_batch_size: int, max_num_tokens: int,
                 before_step: Callable[[list[StepSeq]], None] | None = None):
        self.runner, self.tokenizer = runner, tokenizer
        self.cfg = runner.model.cfg
        self.max_seq_len = runner.max_seq_len
        self.scheduler = Scheduler(runner.kv, max_batch_size, max_num_tokens)
        self.requests: dict[int, Request] = {}
        self.before_step = before_step or (lambda plan: None)
        self._next_id = 0
        self.steps = 0
        eos = set(self.cfg.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos)

    # ---- requests --------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise InvalidRequest(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt: empty string; expected at least one token")
            if self.tokenizer is None:
                raise InvalidRequest("prompt: text given but the engine has no tokenizer; pass token ids")
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids, text = list(prompt), None
        else:
            raise InvalidRequest(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequest("prompt: empty; expected at least one token")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt: token id {bad[0]} out of range; expected ids in [0, {self.cfg.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise InvalidRequest(f"prompt: {len(ids)} tokens; the engine's max_seq_len is {self.max_seq_len}, so "
                                 f"prompts may have at most {self.max_seq_len - 1}")
        kv = self.runner.kv
        g, loc = kv.blocks_needed(len(ids) + 1)
        if g > kv.global_pool.num_blocks or loc > kv.local_pool.num_blocks:
            raise InvalidRequest(f"prompt: {len(ids)} tokens need {g} KV blocks; the pool has "
                                 f"{kv.global_pool.num_blocks}")
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        req = Request(self._next_id, text, ids, params, seed, self.eos_ids, arrival_step=self.steps)
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
        return self.scheduler.has_work()

    def _retire(self, req: Request) -> None:
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one forward over the scheduled tokens; returns the requests that changed."""
        sched = self.scheduler.schedule()
        if not sched:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress: the KV pool cannot hold any waiting request")
            return []
        plan = [StepSeq(s.request.request_id,
                        s.request.token_ids(s.request.num_computed, s.request.num_computed + s.num_new),
                        s.request.num_computed, self.runner.kv.seqs[s.request.request_id],
                        num_logits=1 if s.completes else 0) for s in sched]
        self.before_step(plan)
        sampled = [s.request for s in sched if s.completes]  # in the order of the logits rows
        logits, tokens = self.runner.step(plan, SamplingRows.of(sampled) if sampled else None)
        self.steps += 1
        for s in sched:
            s.request.num_computed += s.num_new
        if sampled:
            self._emit(logits, tokens, sampled)
        return [s.request for s in sched]

    def _emit(self, logits: torch.Tensor, tokens: torch.Tensor, reqs: list[Request]) -> None:
        want_lp = [r.params.logprobs for r in reqs if r.params.logprobs is not None]
        lp = logprobs(logits, tokens, max(want_lp)) if want_lp else None
        tokens_l = tokens.tolist()  # the step's one wait for the GPU
        lp_l = [x.tolist() for x in lp] if lp is not None else None
        for i, r in enumerate(reqs):
            entry = None
            if r.params.logprobs is not None:
                entry = {tokens_l[i]: lp_l[0][i]}
                for tid, v in zip(lp_l[2][i][: r.params.logprobs], lp_l[1][i][: r.params.logprobs]):
                    entry.setdefault(tid, v)
            self._append(r, tokens_l[i], entry)

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
