"""Concurrency sweep: tokens/s per user and per GPU for ISL/OSL workloads, from measured steps.

For each concurrency c, c requests arrive together (a static batch, the way the published
TensorRT-LLM ISL/OSL figures are run): their prompts are prefilled in chunks of at most
max_num_tokens (each chunk timed, eager), then OSL decode steps run at batch c. The decode step is
timed by CUDA-graph replay at the middle context (ISL + OSL / 2), where its KV read is the mean over
the generation. Hence, per request:
    time  = prefill(c x ISL tokens) + OSL x step(c, ISL + OSL / 2)
    tokens/s per user = OSL / time,  tokens/s per GPU = c x OSL / time / tp_size.
A model over measured parts, labelled as such in every output: it leaves out the scheduler's host
time between steps and the growth of the KV read being linear instead of exact.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SweepPoint:
    isl: int
    osl: int
    concurrency: int
    prefill_ms: float  # all c prompts
    step_ms: float  # one decode step at batch c, context isl + osl / 2
    tp_size: int

    @property
    def total_s(self) -> float:
        return (self.prefill_ms + self.osl * self.step_ms) / 1e3

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.osl / self.total_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.concurrency * self.osl / self.total_s / self.tp_size

    def row(self) -> str:
        return (f"| {self.isl}/{self.osl} | {self.concurrency} | {self.prefill_ms:.1f} | {self.step_ms:.3f} | "
                f"{1e3 / self.step_ms:.0f} | {self.tokens_per_s_per_user:.1f} | {self.tokens_per_s_per_gpu:.1f} |")


HEADER = ("| ISL/OSL | concurrency | prefill ms (all prompts) | decode step ms | decode tok/s/user | "
          "end-to-end tok/s/user | tok/s/GPU |\n|---|---|---|---|---|---|---|")


def parse_workloads(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        try:
            isl, osl = (int(x) for x in item.split("/"))
        except ValueError:
            raise ValueError(f"--sweep item {item!r}: expected ISL/OSL such as 128/2048") from None
        if isl < 1 or osl < 1:
            raise ValueError(f"--sweep item {item!r}: ISL and OSL must be positive")
        out.append((isl, osl))
    return out


def prefill_ms(prefill_chunk, concurrency: int, isl: int, max_num_tokens: int) -> float:
    """Time of prefilling `concurrency` prompts of `isl` tokens, packed into steps of at most
    max_num_tokens tokens; prefill_chunk(prompts, isl) times one step of that many prompts.
    Steps of equal shape are timed once."""
    per_step = max(1, max_num_tokens // isl)
    full, rest = divmod(concurrency, per_step)
    total = full * prefill_chunk(per_step, isl) if full else 0.0
    if rest:
        total += prefill_chunk(rest, isl)
    return total
