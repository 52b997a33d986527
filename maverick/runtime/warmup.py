"""The load-time warm-up: eager steps of every shape class the kernels compile apart, so that serving compiles none.

Triton compiles a kernel once per set of constexprs and integer specializations (== 1, divisible by 16), and
the kernel wrappers derive their tiles from a step's shape. CUDA graphs fix the shapes of the steps they
replay, but the other steps (several prompts or prompt chunks beside decode rows, verify windows that the
graphs do not take) run eagerly at any shape. Without the classes below, `maverick-bench compiles` counted 11
compiles while serving after load (H100, 72da23b), each one stalling every request in the engine.

The classes (see each kernel wrapper in maverick_plugins/):
- tokens a step (M of the GEMMs, the MoE and the router kernels): one by one up to one past the largest
  small-M threshold of the dispatch table (GEMV <= 2, split-K GEMM and MoE <= 16 tokens on H200), then
  p - 1, p and p + 1 for every power of two p, and the largest step;
- new tokens a sequence (the attention kernels): one by one up to one past the decode kernel's limit (its
  rows are the next power of two of new tokens x query heads per kv head), then the prefill kernel's tiles
  (the next power of two of the new tokens up to 64) and one past each;
- sequences a step: 1 (one sequence per kv head runs alone, with more warps), 2, 3, 4 (the merge's slice of
  head_dim grows with sequences x kv heads up to 4) and max_batch_size; decode steps at every token class.
"""
from __future__ import annotations

PREFILL_TILES = (16, 32, 64)  # the prefill attention kernel's tile sizes (block_m, block_n: pow2 of new tokens)
BATCH_CLASSES = (1, 2, 3, 4)


def token_classes(most: int, dense_to: int) -> list[int]:
    """1..dense_to one by one, then p - 1, p, p + 1 for each power of two p, and most - 1, most; none above most."""
    sizes = set(range(1, dense_to + 1))
    p = 2
    while p <= most:
        sizes |= {p - 1, p, p + 1}
        p *= 2
    sizes |= {most - 1, most}
    return sorted(s for s in sizes if 1 <= s <= most)


def warmup_shapes(max_num_tokens: int, max_batch_size: int, max_seq_len: int, small_m: int,
                  decode_new_tokens: int) -> list[tuple[int, int]]:
    """(sequences, new tokens each) of the warm-up's eager steps, each prefilling from position 0: single
    sequences at every token class, decode-like steps (one token a sequence) at every batch class, and
    multi-sequence steps at every new-tokens class of the attention kernels."""
    longest = min(max_num_tokens, max_seq_len - 1)
    shapes = {(1, n) for n in token_classes(longest, small_m + 1)}
    shapes |= {(b, 1) for b in token_classes(max_batch_size, small_m + 1)}
    per_seq = set(range(1, decode_new_tokens + 2)) | {t + d for t in PREFILL_TILES for d in (0, 1)}
    for b in {*BATCH_CLASSES, max_batch_size}:
        shapes |= {(b, q) for q in per_seq if b <= max_batch_size and b * q <= max_num_tokens and q < max_seq_len}
    return sorted(shapes, key=lambda s: (-s[0] * s[1], s))  # the largest first: the allocator's peak at once
