"""One step's plan (plain Python): the scheduler's choice (Scheduled) and what every rank's runner is told
(StepSeq, broadcast to the ranks). The rest of a step's state: its model inputs, a ForwardBatch
(maverick/layers/forward_batch.py); its sampling parameters, SamplingRows (maverick/layers/sampler.py); the
step in flight, Launched (engine.py)."""
from __future__ import annotations

from dataclasses import dataclass

from .kv_cache import SeqBlocks
from .request import Request


@dataclass
class Scheduled:
    request: Request
    num_new: int  # tokens fed this step: all_token_ids[num_computed : num_computed + num_new]

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the last known token, so a new token is sampled."""
        return self.request.num_computed + self.num_new == self.request.num_tokens


@dataclass
class StepSeq:
    """One sequence's share of a step: new tokens starting at `start` (= tokens already cached)."""

    seq_id: int
    tokens: list[int]
    start: int
    blocks: SeqBlocks
    num_logits: int = 1  # logits for the last n new tokens (n > 1: verifying draft tokens)
    feed_row: int = -1  # >= 0: the last token is row feed_row of the previous step's samples (on the GPU)
    # speculative decoding (maverick/runtime/speculative.py): tokens = [last committed] + draft_len placeholders
    # the draft fills on the device; the draft first runs over draft_tokens at positions draft_start..start-1
    draft_len: int = 0
    draft_start: int = 0
    draft_tokens: list[int] | None = None
