"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds; logprobs.

Randomness is counter-based: the noise for (seed, step, token id) is a hash, so a request samples
the same tokens whatever else shares its batch, and the whole sampler is capturable in a CUDA graph
(no generator state, no host sync). Gumbel-max over the filtered logits samples exactly from the
renormalised softmax.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [N] fp32; 0 = greedy
    top_k: torch.Tensor  # [N] int64; 0 = off
    top_p: torch.Tensor  # [N] fp32
    min_p: torch.Tensor  # [N] fp32
    seeds: torch.Tensor  # [N] int64
    offsets: torch.Tensor  # [N] int64: tokens generated so far (the counter)


def sample(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Token ids [N] from fp32 logits [N, vocab]."""
    N, V = logits.shape
    greedy_ids = logits.argmax(dim=-1)
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
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    gumbel = -torch.log(-torch.log(uniform_noise(t.seeds, t.offsets, V)))
    sampled = torch.where(keep, scaled + gumbel, torch.full_like(scaled, float("-inf"))).argmax(dim=-1)
    return torch.where((t.temperature == 0) | (t.top_k == 1), greedy_ids, sampled)


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's distribution: sampled [N], top-n values and ids [N, top_n]."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0]
    top_vals, top_ids = lp.topk(max(top_n, 1), dim=-1)
    return chosen, top_vals[:, :top_n], top_ids[:, :top_n]
