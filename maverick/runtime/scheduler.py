"""In-flight batching with chunked prefill (plain Python).

Each step has a token budget (max_num_tokens) shared by running requests first (decode, or the rest
of a prefill), then newly admitted ones. Admission into the batch is separate from the budget: a
request joins only while there are fewer than max_batch_size running and the KV pool can hold it.
Capacity policies (TensorRT-LLM's names):
- MAX_UTILIZATION (default): admit when the whole prompt (and one new token) fits. When the pool runs dry
  mid-generation the newest request is preempted (its blocks freed, recomputed later), so the oldest
  requests always make progress. Most requests in flight; some recomputation under pressure.
- GUARANTEED_NO_EVICT: admit only while every running request's worst case (prompt + max_tokens, at most
  max_seq_len) fits beside this one's; nothing is ever preempted.
"""
from __future__ import annotations

from collections import deque

from .kv_cache import KVCacheManager
from .request import Request, Status
from .step import Scheduled


POLICIES = ("MAX_UTILIZATION", "GUARANTEED_NO_EVICT")


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_batch_size: int, max_num_tokens: int,
                 policy: str = "MAX_UTILIZATION", max_seq_len: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"capacity_scheduler_policy={policy!r}: expected one of {list(POLICIES)}")
        self.kv, self.max_batch_size, self.max_num_tokens = kv, max_batch_size, max_num_tokens
        self.policy, self.max_seq_len = policy, max_seq_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Drop a finished (or aborted) request and return all its KV blocks."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed, req.draft_start, req.status = 0, 0, Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _worst_case(self, req: Request) -> int:
        """Tokens a request can hold at most: its prompt and every token it may generate."""
        n = len(req.prompt_token_ids) + req.params.max_tokens
        return n if self.max_seq_len is None else min(n, self.max_seq_len)

    def _admissible(self, req: Request) -> bool:
        if self.policy == "MAX_UTILIZATION":
            return self.kv.can_grow(req.request_id, req.num_tokens + 1)
        need = [self.kv.blocks_needed(self._worst_case(r)) for r in self.running + [req]]
        return (sum(g for g, _ in need) <= self.kv.global_pool.num_blocks
                and sum(loc for _, loc in need) <= self.kv.local_pool.num_blocks)

    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_tokens
        out: list[Scheduled] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted below to make room for an older request
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            while not self.kv.can_grow(req.request_id, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue
            self.kv.grow(req.request_id, req.num_computed + n)
            out.append(Scheduled(req, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            req = self.waiting[0]
            if not self._admissible(req):
                break  # KV admission: wait until the pool can hold it
            self.waiting.popleft()
            n = min(req.num_tokens - req.num_computed, budget)
            self.kv.grow(req.request_id, req.num_computed + n)
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(Scheduled(req, n))
            budget -= n
        return out
