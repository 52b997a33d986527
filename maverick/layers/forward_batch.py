"""The one object that carries a step's metadata from the runtime to the model.

Every field is a tensor with a shape fixed by (tokens T, sequences B, padded new tokens per
sequence Q, block-table widths), so a step replays inside a CUDA graph once those are padded.
The runtime builds it (maverick.runtime.batch); the model only reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] token ids of every sequence's new tokens, concatenated
    positions: torch.Tensor  # [T] absolute positions
    q_index: torch.Tensor  # [B, Q] token index of each sequence's j-th new token (padding -> 0)
    q_positions: torch.Tensor  # [B, Q] positions of those tokens (-1 for padding)
    token_to_padded: torch.Tensor  # [T] b * Q + j
    ctx_lens: torch.Tensor  # [B] tokens already in the cache before this step
    global_block_table: torch.Tensor  # [B, nb_global] blocks of the NoPE (global) layers
    local_block_table: torch.Tensor  # [B, nb_local] ring blocks of the chunked RoPE layers
    global_slots: torch.Tensor  # [T] flat cache slot per token, global layers (scratch if skipped)
    local_slots: torch.Tensor  # [T] flat cache slot per token, local ring (scratch if overwritten)
    logits_indices: torch.Tensor  # [N] tokens whose logits are wanted

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def pad_logits(self, rows: int) -> "ForwardBatch":
        """Pad logits_indices to `rows` entries (padding rows read token 0; their logits are dropped)."""
        n = self.logits_indices.shape[0]
        if n < rows:
            self.logits_indices = torch.cat([self.logits_indices, self.logits_indices.new_zeros(rows - n)])
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields by name, in declaration order (the runtime moves them to the GPU in one copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
