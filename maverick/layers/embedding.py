"""Vocabulary-parallel embedding and lm_head: each rank holds padded_vocab / tp rows."""
from __future__ import annotations

import torch
from torch import nn

from .collectives import all_gather, all_reduce
from maverick.config import divide


class VocabParallelEmbedding(nn.Module):
    def __init__(self, padded_vocab: int, hidden: int, tp_size: int, tp_rank: int, dtype: torch.dtype):
        super().__init__()
        self.rows = divide(padded_vocab, tp_size, "padded vocab (per tp_size)")
        self.start = tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = self.weight[local.clamp(0, self.rows - 1)] * mine[:, None].to(self.weight.dtype)
        return all_reduce(out)  # each id lives on exactly one rank


class ParallelLMHead(nn.Module):
    def __init__(self, vocab: int, padded_vocab: int, hidden: int, tp_size: int, dtype: torch.dtype):
        super().__init__()
        self.vocab = vocab
        rows = divide(padded_vocab, tp_size, "padded vocab (per tp_size)")
        self.weight = nn.Parameter(torch.empty(rows, hidden, dtype=dtype), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] on every rank."""
        local = torch.nn.functional.linear(h, self.weight).float()
        return all_gather(local, dim=-1)[:, : self.vocab]
