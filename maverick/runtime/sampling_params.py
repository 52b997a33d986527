"""SamplingParams: how one request samples and when it stops (plain Python, validated)."""
from __future__ import annotations

from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request parameter or prompt is invalid; the message names the field and the allowed range."""


# Seeds are 64-bit unsigned (OpenAI's and vLLM's range); the sampler's noise mixes all 64 bits.
SEED_LIMIT = 1 << 64


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; n: also the top n
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def bad(name, want):
            raise InvalidRequest(f"{name}={getattr(self, name)!r}: expected {want}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        # numbers become Python floats here, so an int too large for a double (10**400) is refused now,
        # not inside a step where it would fail every request of the batch
        for name in ("temperature", "top_p", "min_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(name, "a number")
            try:
                setattr(self, name, float(v))
            except OverflowError:
                bad(name, "a finite number")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "an integer >= 1")
        if not 0 <= self.temperature < float("inf"):
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off; values >= the vocabulary size are off too)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            bad("seed", "an integer in [0, 2**64) or None")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "an integer in [0, 20] or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and (not isinstance(self.stop, (list, tuple))
                                      or not all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", "a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of non-negative token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
