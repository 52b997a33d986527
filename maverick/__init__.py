"""Maverick: a min-latency FP8 inference engine for Llama 4.

    from maverick import LLM, SamplingParams
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "KvCacheConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `import maverick` stays cheap for the builder and checkpoint tools.
    if name == "LLM":
        from maverick.runtime.llm import LLM

        return LLM
    if name == "KvCacheConfig":
        from maverick.runtime.kv_budget import KvCacheConfig

        return KvCacheConfig
    if name == "SamplingParams":
        from maverick.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'maverick' has no attribute {name!r}")
