"""The peer baseline: transformers' own Llama 4 on a reduced Maverick that fits one GPU.

Same config for both engines: Maverick's full width (hidden 5120, 40/8 heads, dense FFN 16384,
experts 8192) with fewer layers and experts (default 4 layers, 16 experts, dense/MoE alternating).
transformers runs it in bf16 (eager generate, greedy, its default attention); maverick runs it as
one rank (tp 1) with its decode step in a CUDA graph, FP8 and bf16. Both decode one sequence after
the same prompt on the same card in the same process; the ratio is transformers' time per token
over ours. transformers is the floor, not the goal.
"""
from __future__ import annotations

import gc
import time

import torch

from maverick.config import PRESETS, BuildConfig, ModelConfig, QuantConfig


def reduced_maverick(layers: int = 4, experts: int = 16) -> dict:
    return dict(PRESETS["maverick"], num_hidden_layers=layers, num_local_experts=experts)


def transformers_ms_per_token(text_config: dict, prompt_len: int, new_tokens: int) -> float:
    """Greedy generate with transformers (bf16, random weights): (time for 1 + n tokens - time for 1) / n."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Llama4ForCausalLM(Llama4TextConfig(**text_config)).eval()
    finally:
        torch.set_default_dtype(default)
    ids = torch.randint(4, 200000, (1, prompt_len), device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=text_config.get("pad_token_id"))
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    run(2)  # warm-up
    first = min(run(1) for _ in range(2))
    full = min(run(1 + new_tokens) for _ in range(2))
    model.to("meta")  # give the GPU memory back before our engine loads
    gc.collect()
    torch.cuda.empty_cache()
    return (full - first) / new_tokens


def maverick_ms_per_token(text_config: dict, quant: str | None, prompt_len: int, new_tokens: int,
                          bandwidth: float) -> float:
    from maverick.bench.measure import decode_step
    from maverick.builder.synthetic import synthetic_model
    from maverick.runtime.model_runner import ModelRunner

    cfg = ModelConfig._from_text_config(text_config)
    ctx = prompt_len + new_tokens // 2  # the mean context over the generation
    build = BuildConfig(tp_size=1, max_batch_size=1, max_seq_len=prompt_len + new_tokens + 64,
                        quant=QuantConfig(quant, None), kv_cache_block_size=64)
    model = synthetic_model(cfg, build, 0, "cuda")
    runner = ModelRunner(model, max_seq_len=build.max_seq_len, max_batch_size=1,
                         block_size=build.kv_cache_block_size, device="cuda")
    ms = decode_step(runner, cfg, build, 1, ctx, bandwidth, 1).step_ms
    del runner, model
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def peer_baseline(bandwidth: float, layers: int = 4, experts: int = 16, prompt_len: int = 128,
                  new_tokens: int = 64) -> list[tuple[str, float]]:
    """[(engine, ms per token)], transformers first."""
    tc = reduced_maverick(layers, experts)
    rows = [("transformers bf16 (eager generate)", transformers_ms_per_token(tc, prompt_len, new_tokens))]
    for quant in ("FP8", None):
        label = f"maverick {'FP8' if quant else 'bf16'} (tp 1, CUDA graph)"
        rows.append((label, maverick_ms_per_token(tc, quant, prompt_len, new_tokens, bandwidth)))
    return rows
