"""The model layout an engine's build config implies for one rank."""
from maverick.config import BuildConfig, torch_dtype
from maverick.models import ModelSpec


def model_spec(build: BuildConfig, rank: int) -> ModelSpec:
    q = build.quant
    experts = {"FP8": "tensor", "FP8_PER_CHANNEL_PER_TOKEN": "channel"}.get(q.algo)
    return ModelSpec(tp_size=build.tp_size, tp_rank=rank, ep_size=build.ep_size, dtype=torch_dtype(build.dtype),
                     fp8=q.algo == "FP8", fp8_kv_cache=q.kv_cache_algo == "FP8", experts_fp8=experts,
                     lm_head_fp8=build.lm_head_quant_algo == "FP8_PER_CHANNEL_PER_TOKEN")
