"""Turn one scheduled step (which tokens of which sequences) into the model's ForwardBatch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick.layers.forward_batch import ForwardBatch

from .kv_cache import SeqBlocks, cdiv


@dataclass
class StepSeq:
    """One sequence's share of a step: new tokens starting at `start` (= tokens already cached)."""

    seq_id: int
    tokens: list[int]
    start: int
    blocks: SeqBlocks
    num_logits: int = 1  # logits for the last n new tokens (n > 1: verifying draft tokens)


def build_forward_batch(seqs: list[StepSeq], block_size: int, chunk_size: int, scratch_global: int,
                        scratch_local: int, pad_batch: int = 0, pad_q: int = 0, pad_global_blocks: int = 0,
                        pad_tokens: int = 0, pad_local_blocks: int = 0) -> ForwardBatch:
    """Flatten seqs into a ForwardBatch (CPU tensors).

    scratch_*: the flat slot that padded or overwritten tokens write to (first slot of the
    scratch block). pad_*: minimum sizes, so CUDA-graph replays see fixed shapes.
    """
    B = max(len(seqs), pad_batch)
    Q = max([len(s.tokens) for s in seqs] + [pad_q, 1])
    nbg = max([len(s.blocks.global_blocks) for s in seqs] + [pad_global_blocks, 1])
    nbl = max([len(s.blocks.local_blocks) for s in seqs] + [pad_local_blocks, 1])
    ids, pos, gslots, lslots, t2p, logits = [], [], [], [], [], []
    q_index = [[0] * Q for _ in range(B)]
    q_pos = [[-1] * Q for _ in range(B)]
    ctx = [0] * B
    gtab = [[0] * nbg for _ in range(B)]
    ltab = [[0] * nbl for _ in range(B)]
    for b, s in enumerate(seqs):
        ctx[b] = s.start
        gtab[b][: len(s.blocks.global_blocks)] = s.blocks.global_blocks
        ltab[b][: len(s.blocks.local_blocks)] = s.blocks.local_blocks
        last = s.start + len(s.tokens) - 1
        keep_from = last // chunk_size * chunk_size  # ring keeps only the last chunk this step touches
        for j, tok in enumerate(s.tokens):
            p = s.start + j
            t = len(ids)
            ids.append(tok)
            pos.append(p)
            q_index[b][j], q_pos[b][j] = t, p
            t2p.append(b * Q + j)
            gb = s.blocks.global_blocks
            gslots.append(gb[p // block_size] * block_size + p % block_size if gb else scratch_global)
            r = p % chunk_size
            lb = s.blocks.local_blocks
            lslots.append(lb[r // block_size] * block_size + r % block_size
                          if lb and p >= keep_from else scratch_local)
        n = len(ids)
        logits += range(n - s.num_logits, n)
    for _ in range(max(0, pad_tokens - len(ids))):  # padded tokens write to scratch, are never read
        t2p.append(0)
        ids.append(0)
        pos.append(0)
        gslots.append(scratch_global)
        lslots.append(scratch_local)

    def lt(x):
        return torch.tensor(x, dtype=torch.long)

    return ForwardBatch(input_ids=lt(ids), positions=lt(pos), q_index=lt(q_index), q_positions=lt(q_pos),
                        token_to_padded=lt(t2p), ctx_lens=lt(ctx), global_block_table=lt(gtab),
                        local_block_table=lt(ltab), global_slots=lt(gslots), local_slots=lt(lslots),
                        logits_indices=lt(logits))


def ring_blocks(max_seq_len: int, chunk_size: int, block_size: int) -> int:
    """Blocks of one sequence's local ring."""
    return cdiv(min(max_seq_len, chunk_size), block_size)
