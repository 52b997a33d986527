"""Paged KV bookkeeping (pure Python): a pool of fixed-size blocks (the unit of KV admission) and the block
tables of the two kinds of Llama 4 attention layers.

Global (NoPE) layers keep every position: ceil(len / block_size) blocks. Local (chunked RoPE) layers
keep a ring of one attention chunk: ceil(min(len, chunk) / block_size) blocks, never more, so at
Maverick's 8192-token chunk a 128K-token sequence holds 16x less local KV than global KV.
"""
from __future__ import annotations

from dataclasses import dataclass, field

class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks={num_blocks}: expected >= 0")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} of {self.num_blocks} free")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class SeqBlocks:
    global_blocks: list[int] = field(default_factory=list)
    local_blocks: list[int] = field(default_factory=list)


class KVCacheManager:
    def __init__(self, num_global_blocks: int, num_local_blocks: int, block_size: int, chunk_size: int,
                 has_global: bool = True, has_local: bool = True):
        self.block_size, self.chunk_size = block_size, chunk_size
        self.has_global, self.has_local = has_global, has_local
        self.global_pool = BlockAllocator(num_global_blocks)
        self.local_pool = BlockAllocator(num_local_blocks)
        self.seqs: dict[int, SeqBlocks] = {}

    def blocks_needed(self, length: int) -> tuple[int, int]:
        g = cdiv(length, self.block_size) if self.has_global else 0
        loc = cdiv(min(length, self.chunk_size), self.block_size) if self.has_local else 0
        return g, loc

    def extra_blocks(self, seq_id: int, length: int) -> tuple[int, int]:
        s = self.seqs.get(seq_id, SeqBlocks())
        g, loc = self.blocks_needed(length)
        return max(0, g - len(s.global_blocks)), max(0, loc - len(s.local_blocks))

    def can_grow(self, seq_id: int, length: int) -> bool:
        return self.can_grow_all({seq_id: length})

    def can_grow_all(self, lengths: dict[int, int]) -> bool:
        """Whether every sequence can grow to its length at once (seq_id -> length)."""
        need = [self.extra_blocks(seq_id, n) for seq_id, n in lengths.items()]
        return self._fits(sum(g for g, _ in need), sum(loc for _, loc in need))

    def _fits(self, g: int, loc: int) -> bool:
        return g <= self.global_pool.num_free and loc <= self.local_pool.num_free

    def grow(self, seq_id: int, length: int) -> SeqBlocks:
        """Make sure seq_id can hold `length` tokens; raise OutOfBlocks without allocating otherwise."""
        g, loc = self.extra_blocks(seq_id, length)
        if not self._fits(g, loc):
            raise OutOfBlocks(f"sequence {seq_id} needs {g} global + {loc} local KV blocks; "
                              f"{self.global_pool.num_free} + {self.local_pool.num_free} free")
        s = self.seqs.setdefault(seq_id, SeqBlocks())
        if g:
            s.global_blocks += self.global_pool.allocate(g)
        if loc:
            s.local_blocks += self.local_pool.allocate(loc)
        return s

    def free(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id, None)
        if s is not None:
            self.global_pool.free(s.global_blocks)
            self.local_pool.free(s.local_blocks)

    @property
    def all_free(self) -> bool:
        return (not self.seqs and self.global_pool.num_free == self.global_pool.num_blocks
                and self.local_pool.num_free == self.local_pool.num_blocks)

    @property
    def blocks_in_use(self) -> int:
        return (self.global_pool.num_blocks - self.global_pool.num_free
                + self.local_pool.num_blocks - self.local_pool.num_free)
