"""Vocabulary-parallel embedding and lm_head: each rank holds padded_vocab / tp rows."""
from __future__ import annotations

import torch
from torch import nn

import maverick_plugins as ops

from .collectives import all_gather, all_reduce
from maverick.config import divide


class VocabParallelEmbedding(nn.Module):
    def __init__(self, padded_vocab: int, hidden: int, tp_size: int, tp_rank: int, dtype: torch.dtype):
        super().__init__()
        self.rows = divide(padded_vocab, tp_size, "padded vocab (per tp_size)")
        self.start = tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return all_reduce(ops.embedding_rows(ids, self.weight, self.start))  # each id lives on exactly one rank


def fp8_lm_head_rows(rows: int) -> int:
    """An FP8 lm_head's rows a rank, padded with zero rows to a multiple of 16: past the GEMV's one or two
    tokens it runs on cuBLAS FP8, which needs that (Maverick at TP8: 25256 -> 25264)."""
    return -(-rows // 16) * 16


class ParallelLMHead(nn.Module):
    def __init__(self, vocab: int, padded_vocab: int, hidden: int, tp_size: int, dtype: torch.dtype,
                 fp8: bool = False):
        super().__init__()
        self.vocab, self.fp8 = vocab, fp8
        self.rows = rows = divide(padded_vocab, tp_size, "padded vocab (per tp_size)")
        if fp8:  # e4m3 rows, one scale each (the builder's amax / 448); activations quantized per token
            rows = fp8_lm_head_rows(rows)
            self.weight = nn.Parameter(torch.empty(rows, hidden, dtype=torch.float8_e4m3fn), requires_grad=False)
            self.weight_scale = nn.Parameter(torch.empty(rows, dtype=torch.float32), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(rows, hidden, dtype=dtype), requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, vocab] on every rank."""
        if self.fp8:
            local = ops.fp8_linear(h, self.weight, self.weight_scale, None, torch.float32)[:, : self.rows]
        else:
            local = torch.nn.functional.linear(h, self.weight).float()
        return all_gather(local, dim=-1)[:, : self.vocab]


def vocab_parallel_argmax(local: torch.Tensor, first: int) -> torch.Tensor:
    """The argmax [N] over logits split by vocabulary columns across the TP ranks: local [N, cols] holds this
    rank's columns first..first + cols - 1 (padding columns -inf). Each rank's best (value, global index) pair
    is gathered, a few bytes a row instead of the logits; the lowest index wins ties, like argmax."""
    best, idx = local.max(dim=-1)
    pairs = all_gather(torch.stack([best, (idx + first).float()], dim=-1), dim=-1)  # indices < 2**24: exact
    pairs = pairs.view(local.shape[0], -1, 2)  # [N, ranks, (value, index)]
    return pairs[:, :, 1].gather(1, pairs[:, :, 0].argmax(dim=1, keepdim=True))[:, 0].long()
