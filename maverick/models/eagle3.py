"""The EAGLE-3 draft network (one decoder layer over the target's own features).

Step 1 of a draft chain fuses the target's hidden states at three layers (`fc`: [T, 3H] -> [T, H]); later
steps feed the draft's own output hidden state instead. Logits come from lm_head(norm(out)) over the draft
vocabulary; draft id d is target id d + d2t[d]. Parameter names are the checkpoint's (NVIDIA's
LlamaForCausalLMEagle3), with q|k|v and gate|up fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from maverick.config import Eagle3Config
from maverick.layers.eagle3_layer import Eagle3DecoderLayer, frozen
from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.norm import RMSNorm


class Eagle3Draft(nn.Module):
    def __init__(self, cfg: Eagle3Config, dtype: torch.dtype):
        super().__init__()
        self.cfg = cfg
        self.fc = frozen(cfg.hidden_size, 3 * cfg.target_hidden_size, dtype=dtype)
        self.midlayer = Eagle3DecoderLayer(cfg, dtype)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = frozen(cfg.draft_vocab_size, cfg.hidden_size, dtype=dtype)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """One pool like a target layer's: [blocks + 1 (scratch), block_size, kv_heads, head_dim]."""
        return (num_blocks + 1, block_size, self.cfg.num_key_value_heads, self.cfg.head_dim)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's hidden states at the three aux layers, concatenated [T, 3H], to the draft's [T, H]."""
        return F.linear(aux, self.fc)

    def forward(self, embeds: torch.Tensor, h: torch.Tensor, batch: ForwardBatch,
                kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """embeds [T, H] (the target's embedding of this step's tokens), h [T, H] (fused target features or
        the previous draft step's output). Returns [T, H] before the final norm: the next step's h."""
        return self.midlayer(embeds, h, batch, kv_cache)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, draft_vocab_size] of output rows out [N, H]."""
        return F.linear(self.norm(out), self.lm_head).float()

    def target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft vocabulary ids to the target's."""
        return draft_ids + self.d2t[draft_ids]
