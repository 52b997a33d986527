"""The EAGLE-3 draft network (one decoder layer over the target's own features).

Step 1 of a draft chain fuses the target's hidden states at three layers (`fc`: [T, 3H] -> [T, H]); later
steps feed the draft's own output hidden state instead. Logits come from lm_head(norm(out)) over the draft
vocabulary; draft id d is target id d + d2t[d]. Parameter names are the checkpoint's (NVIDIA's
LlamaForCausalLMEagle3), with q|k|v and gate|up fused.

Under tensor parallelism the layer is replicated (one layer: small) but lm_head is split by vocabulary rows:
NVIDIA's Maverick head keeps the full 202,048-token vocabulary, 2.07 GB in bf16, which a draft step would
read whole on every rank (0.43 ms of H200 bandwidth, more than the rest of the step). Each rank reads its
1/tp and the ranks agree on the argmax by exchanging one (max, index) pair per row.
"""
from __future__ import annotations

import torch
from torch import nn

from maverick.config import Eagle3Config
from maverick.layers.collectives import all_gather
from maverick.layers.eagle3_layer import Eagle3DecoderLayer
from maverick.layers.linear import Linear
from maverick.layers.embedding import vocab_parallel_argmax
from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.norm import RMSNorm


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: Eagle3Config, dtype: torch.dtype, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        self.cfg, self.tp_size, self.tp_rank = cfg, tp_size, tp_rank
        self.dtype = dtype  # of activations, features and the draft's KV cache
        self.fc = Linear(3 * cfg.target_hidden_size, cfg.hidden_size, dtype, "fc" in cfg.fp8_linears)
        self.midlayer = Eagle3DecoderLayer(cfg, dtype)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.vocab_rows = -(-cfg.draft_vocab_size // tp_size)  # this rank's rows; the last rank's padded
        self.lm_head = Linear(cfg.hidden_size, self.vocab_rows, dtype, "lm_head" in cfg.fp8_linears)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One pool like a target layer's: [blocks + 1 (scratch), block_size, kv_heads, head_dim]."""
        return (num_blocks + 1, block_size, self.cfg.num_key_value_heads, self.cfg.head_dim)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's hidden states at the three aux layers, concatenated [T, 3H], to the draft's [T, H]."""
        return self.fc(aux)

    def forward(self, embeds: torch.Tensor, h: torch.Tensor, batch: ForwardBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """embeds [T, H] (the target's embedding of this step's tokens), h [T, H] (fused target features or
        the previous draft step's output). Returns [T, H] before the final norm: the next step's h."""
        return self.midlayer(embeds, h, batch, kv_cache)

    def shard_lm_head(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the checkpoint's lm_head [draft_vocab_size, H] (zero rows past the vocabulary)."""
        rows = full[self.tp_rank * self.vocab_rows:(self.tp_rank + 1) * self.vocab_rows]
        out = full.new_zeros(self.vocab_rows, full.shape[1])
        out[:rows.shape[0]] = rows  # (F.pad has no FP8 kernel)
        return out

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, draft_vocab_size] of output rows out [N, H] (this rank's columns with tp_size > 1
        and no process group: one-rank benchmarks)."""
        local = self.lm_head(self.norm(out)).float()
        if self.tp_size == 1:
            return local
        return all_gather(local, dim=-1)[:, :self.cfg.draft_vocab_size]

    def propose(self, out: torch.Tensor) -> torch.Tensor:
        """Target ids [N] of the draft's argmax over output rows out [N, H]: each rank's best of its rows, then
        the best of the ranks' (value, global index) pairs (the lowest index on ties, like argmax)."""
        local = self.lm_head(self.norm(out)).float()
        if self.tp_size == 1:
            return self.target_ids(local.argmax(dim=-1))
        first = self.tp_rank * self.vocab_rows
        col = torch.arange(local.shape[1], device=local.device) + first
        local = local.masked_fill(col >= self.cfg.draft_vocab_size, float("-inf"))
        return self.target_ids(vocab_parallel_argmax(local, first))

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft vocabulary ids to the target's."""
        return draft_ids + self.d2t[draft_ids]
