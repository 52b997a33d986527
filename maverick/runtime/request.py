"""A request's state and its user-facing outputs (plain Python)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt after validation and tokenization (EngineCore.encode): token ids, and its text if given as text."""

    ids: list[int]
    text: str | None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob}, sampled first
    text_diff: str = ""
    token_ids_diff: list[int] = field(default_factory=list)

    @property
    def cumulative_logprob(self) -> float | None:
        if self.logprobs is None:
            return None
        return sum(next(iter(d.values())) for d in self.logprobs)


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


@dataclass(eq=False)  # an entity: the scheduler's `in` and `remove` compare identity, not every field
class Request:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    num_computed: int = 0  # tokens whose KV is in the cache
    draft_start: int = 0  # with speculative decoding: the first position whose target features the draft has not run
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    arrival_step: int = 0
    # incremental detokenization window (detokenize_step below)
    prefix_offset: int = 0
    read_offset: int = 0
    # streaming cursors
    sent_tokens: int = 0
    sent_text: int = 0
    delivered: bool = False  # the final output was handed out (generate_async)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode step wants one token of a
        context that may be 128K long)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - p)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status, self.finish_reason, self.stop_reason = Status.FINISHED, reason, stop_reason

    def _streamable_text_end(self) -> int:
        """While running, hold back a tail that could be the start of a stop string (partial UTF-8
        characters never reach self.text: the detokenizer holds them back)."""
        if self.finished:
            return len(self.text)
        end = len(self.text)
        if self.params.stop:
            end = min(end, len(self.text) - (max(len(s) for s in self.params.stop) - 1))
        return max(end, self.sent_text)

    def has_delta(self, text: bool) -> bool:
        """Whether output(delta=True) would carry something new: text (when detokenized) or tokens."""
        if text:
            return self._streamable_text_end() > self.sent_text
        return len(self.output_token_ids) > self.sent_tokens

    def output(self, delta: bool = False) -> RequestOutput:
        """A snapshot; with delta=True, text_diff/token_ids_diff hold what is new since the last delta."""
        tokens = self.output_token_ids
        end = self._streamable_text_end()
        out = CompletionOutput(0, self.text, list(tokens), self.finish_reason, self.stop_reason,
                               list(self.output_logprobs) if self.params.logprobs is not None else None,
                               self.text[self.sent_text:end], tokens[self.sent_tokens:])
        if delta:
            self.sent_text, self.sent_tokens = end, len(tokens)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [out], self.finished)


# Incremental detokenization: decode a short window per new token instead of the whole output (the whole
# output each step is O(n^2) over a long generation).
def detokenize_step(tokenizer, ids: list[int], prefix_offset: int, read_offset: int,
                    skip_special_tokens: bool) -> tuple[str, int, int]:
    """New text for ids[read_offset:], decoded with ids[prefix_offset:read_offset] as context so that
    merges across the boundary decode right. Holds back a partial UTF-8 character (decoded as U+FFFD)
    until the tokens that complete it arrive. Returns (new text, prefix_offset, read_offset)."""
    prefix = tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=skip_special_tokens)
    full = tokenizer.decode(ids[prefix_offset:], skip_special_tokens=skip_special_tokens)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        return full[len(prefix):], read_offset, len(ids)
    return "", prefix_offset, read_offset
