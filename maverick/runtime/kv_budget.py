"""How many KV blocks a rank allocates (TensorRT-LLM's kv_cache_config).

The engine plans room for max_batch_size sequences of max_seq_len (capped at its kv_cache_max_tokens). At
load the pool is that plan, capped again at `max_tokens`, and on a GPU shrunk to `free_gpu_memory_fraction`
of the memory left free once the weights (and a draft's) are in, less the step's activations and the CUDA
graphs' pool that come after it. A pool that memory leaves too small for one sequence of max_seq_len (or for
the whole plan, where an engine's kv_cache_max_tokens planned less on purpose) is refused with the numbers, not
left to fail at the first long prompt. Every rank takes the smallest pool any rank can hold: rank 0's
scheduler plans for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from maverick import distributed as dist
from maverick.builder.engine_format import EngineConfig
from maverick.builder.memory_plan import draft_slot_bytes, kv_bytes_per_token, workspace_bytes


@dataclass(frozen=True)
class KvCacheConfig:
    """free_gpu_memory_fraction: of the GPU memory free after loading (TensorRT-LLM's default 0.9);
    max_tokens: at most this many tokens a layer (None: the engine's plan)."""

    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        f = self.free_gpu_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"kv_cache_config.free_gpu_memory_fraction={f!r}: expected a number in (0, 1]")
        m = self.max_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"kv_cache_config.max_tokens={m!r}: expected a positive integer or None")

    @classmethod
    def of(cls, value: "KvCacheConfig | dict[str, Any] | None") -> "KvCacheConfig":
        """From a KvCacheConfig, a mapping of its fields (YAML's kv_cache_config), or None (the defaults)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if not isinstance(value, dict):
            raise ValueError(f"kv_cache_config={value!r}: expected a mapping such as "
                             "{'free_gpu_memory_fraction': 0.9, 'max_tokens': 65536}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"kv_cache_config: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def pool_blocks(cfg: EngineConfig, kv: KvCacheConfig, free_bytes: int | None) -> tuple[int, int]:
    """(global, local) blocks for a rank with free_bytes of device memory left after loading (None: no
    device to measure, e.g. the CPU: the plan as it is). Collective under TP: every rank calls it."""
    b, model = cfg.build, cfg.model
    glob, loc = b.kv_pool_blocks(model)
    block = b.kv_cache_block_size
    if kv.max_tokens is not None:
        glob, loc = min(glob, kv.max_tokens // block), min(loc, kv.max_tokens // block)
    planned = glob, loc
    if free_bytes is not None:
        g_tok, l_tok = kv_bytes_per_token(model, b)
        draft = cfg.speculative.draft if cfg.speculative is not None else None
        g_tok += 0 if draft is None else draft_slot_bytes(draft, b)
        want = (glob * g_tok + loc * l_tok) * block
        budget = int(kv.free_gpu_memory_fraction * (free_bytes - sum(workspace_bytes(model, b))))
        if want > budget:
            share = max(budget, 0) / want
            glob, loc = int(glob * share), int(loc * share)
    glob, loc = dist.min_over_ranks(glob), dist.min_over_ranks(loc)
    # one sequence of max_seq_len, or the whole plan where an engine or max_tokens planned less on purpose
    need_g = min(planned[0], -(-b.max_seq_len // block)) if model.nope_layer_ids else 0
    need_l = min(planned[1], -(-min(b.max_seq_len, model.attention_chunk_size) // block)) if model.rope_layer_ids else 0
    if glob < max(need_g, 1 if model.nope_layer_ids else 0) or loc < max(need_l, 1 if model.rope_layer_ids else 0):
        free = "" if free_bytes is None else (f" ({kv.free_gpu_memory_fraction:g} of the {free_bytes / 1e9:.2f} GB "
                                              "free after loading, less the step's activations and CUDA graphs)")
        raise MemoryError(f"KV cache: room for {glob * block} tokens in the global layers and {loc * block} in the "
                          f"local ones{free}, but one sequence of max_seq_len={b.max_seq_len} needs "
                          f"{need_g * block} and {need_l * block}; raise kv_cache_config.free_gpu_memory_fraction "
                          "or max_tokens, or rebuild with a smaller max_seq_len or max_num_tokens")
    return glob, loc
