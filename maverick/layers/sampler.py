"""Batched sampling, all of it: the step's parameters on the host (SamplingRows, one entry per logits row,
broadcast to every rank) and on the device (SamplingTensors), greedy, temperature, top-k, top-p, min-p,
per-request seeds, logprobs.

Randomness is counter-based: the noise for (seed, step, token id) is a hash, so a request samples
the same tokens whatever else shares its batch, and the whole sampler is capturable in a CUDA graph
(no generator state, no host sync). Gumbel-max over the filtered logits samples exactly from the
renormalised softmax.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply), on int64 tensors holding 32-bit values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0, 1) [N, vocab] fp32, a pure function of (seed, offset, token id); seeds are 64-bit (int64 bits of
    an unsigned seed), both halves mixed so that seeds differing only above bit 31 sample differently."""
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None, :]
    lo, hi = seeds[:, None] & _M32, (seeds[:, None] >> 32) & _M32
    h = _hash32(_hash32(lo ^ _hash32(hi ^ _hash32(offsets[:, None] + 0x9E3779B9))) ^ ids)
    return (h.double() + 0.5).div(2.0 ** 32).float()


# Speculative decoding's acceptance test draws its own U(0, 1) per (seed, token index): the counter offset by
# 2**30 (more tokens than any sequence holds) so it never reuses the sampler's noise of a real index.
_ACCEPT_COUNTER = 1 << 30


def acceptance_noise(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """U(0, 1) [N] fp32 for the acceptance test of the draft token at each row's token index."""
    return uniform_noise(seeds, offsets + _ACCEPT_COUNTER, 1)[:, 0]


INT_FIELDS = ("top_k", "seeds", "offsets")
FLOAT_FIELDS = ("temperature", "top_p", "min_p")


@dataclass
class SamplingRows:
    """A step's sampling parameters on the host: one entry per sampled row, in the order of the logits."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    min_p: list[float]
    seeds: list[int]  # int64 bits of the unsigned 64-bit seed
    offsets: list[int]  # tokens generated so far: the counter of the request's noise

    @classmethod
    def of(cls, requests, pending: int = 0, counts: list[int] | None = None) -> "SamplingRows":
        """pending: tokens each request has sampled on the GPU that its output does not hold yet. counts: rows
        per request (a verified draft of k tokens: k + 1 rows, the i-th sampling the request's token i)."""
        counts = counts or [1] * len(requests)
        rs = [(r, i) for r, n in zip(requests, counts) for i in range(n)]
        ps = [r.params for r, _ in rs]
        return cls([p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps], [p.min_p for p in ps],
                   [_int64(r.seed) for r, _ in rs], [len(r.output_token_ids) + pending + i for r, i in rs])

    def __len__(self) -> int:
        return len(self.temperature)

    @property
    def greedy(self) -> bool:
        """Every row takes the argmax (temperature 0 or top_k 1): no sort, no noise needed."""
        return all(t == 0 or k == 1 for t, k in zip(self.temperature, self.top_k))

    def take(self, indices: list[int]) -> "SamplingRows":
        """These rows, in this order (a step run as several graph replays samples each part's rows)."""
        return SamplingRows(**{f.name: [getattr(self, f.name)[i] for i in indices] for f in fields(self)})

    def padded(self, rows: int) -> "SamplingRows":
        """Pad to `rows` with greedy rows (a CUDA graph's fixed batch; their tokens are dropped)."""
        n = rows - len(self)
        pad = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seeds=0, offsets=0)
        return SamplingRows(**{f.name: getattr(self, f.name) + [pad[f.name]] * n for f in fields(self)})

    def to_tensors(self, device: torch.device) -> "SamplingTensors":
        """On the device in two copies (the int64 fields, the fp32 fields), through pinned memory: no stream sync."""
        device = torch.device(device)

        def put(names: tuple[str, ...], dtype: torch.dtype) -> list[torch.Tensor]:
            t = torch.tensor([getattr(self, k) for k in names], dtype=dtype).reshape(len(names), len(self))
            return list((t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t).unbind(0))

        return SamplingTensors(**dict(zip(INT_FIELDS, put(INT_FIELDS, torch.int64))),
                               **dict(zip(FLOAT_FIELDS, put(FLOAT_FIELDS, torch.float32))))


def _int64(seed: int) -> int:
    """A 64-bit unsigned seed as the int64 of the same bits (the tensor's dtype)."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [N] fp32; 0 = greedy
    top_k: torch.Tensor  # [N] int64; 0 = off
    top_p: torch.Tensor  # [N] fp32
    min_p: torch.Tensor  # [N] fp32
    seeds: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [N] int64: tokens generated so far (the counter)


def sample_tokens(logits: torch.Tensor, t: SamplingTensors | None) -> torch.Tensor:
    """Token ids [N]: sample(logits, t), or with t None (every row greedy) the argmax alone, which is what
    sample() returns for greedy rows, without its sort and noise."""
    return logits.argmax(dim=-1) if t is None else sample(logits, t)


def filtered(logits: torch.Tensor, t: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """The temperature-scaled logits [N, vocab] and the tokens top-k, top-p and min-p keep (the most likely
    always): sampling draws from softmax(scaled) renormalized over `keep`."""
    N, V = logits.shape
    temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    scaled = logits / temp[:, None]
    probs = torch.softmax(scaled, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(t.top_k > 0, t.top_k, torch.full_like(t.top_k, V))
    keep_sorted = rank < k[:, None]
    keep_sorted &= (sorted_probs.cumsum(dim=-1) - sorted_probs) < t.top_p[:, None]  # mass before < top_p
    keep_sorted &= sorted_probs >= t.min_p[:, None] * sorted_probs[:, :1]
    keep_sorted[:, 0] = True  # the most likely token always survives
    return scaled, torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def sampling_probs(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The distribution sample() draws from, [N, vocab] fp32 (speculative decoding's acceptance needs it)."""
    scaled, keep = filtered(logits, t)
    return torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Token ids [N] from fp32 logits [N, vocab]."""
    V = logits.shape[1]
    greedy_ids = logits.argmax(dim=-1)
    scaled, keep = filtered(logits, t)
    gumbel = -torch.log(-torch.log(uniform_noise(t.seeds, t.offsets, V)))
    sampled = torch.where(keep, scaled + gumbel, torch.full_like(scaled, float("-inf"))).argmax(dim=-1)
    return torch.where((t.temperature == 0) | (t.top_k == 1), greedy_ids, sampled)


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's distribution: sampled [N], top-n values and ids [N, top_n]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    top_vals, top_ids = lp.topk(max(top_n, 1), dim=-1)
    return chosen, top_vals[:, :top_n], top_ids[:, :top_n]
