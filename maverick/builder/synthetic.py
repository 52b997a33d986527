"""Random weights generated on the device, in exactly the engine layout the builder writes.

Full Maverick cannot be downloaded here; its exact shapes can be made: each rank fills its own
tensors on its GPU (50 GB at TP8), so benchmarks run the same model and runtime code as a built
engine without any file. Scales keep activations O(1): an FP8 weight holds N(0, 32^2) values (clipped
at 448) with weight_scale = 1 / (32 sqrt(in_features)). Router weights are random, so experts are
chosen roughly uniformly.
"""
from __future__ import annotations

import math

import torch

from maverick.config import BuildConfig, ModelConfig
from maverick.layers.rotary import rope_inv_freq
from maverick.models import Llama4ForCausalLM

from .spec import model_spec

FP8_SPREAD = 32.0
ACT_AMAX = 8.0  # static activation scales assume |x| up to 8 after a norm
CHUNK = 1 << 26  # elements per random fill: bounds the bf16 temporary to 128 MB


def _fill_normal(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    flat = t.view(-1)
    for i in range(0, flat.numel(), CHUNK):
        part = flat[i:i + CHUNK]
        r = torch.randn(part.shape, device=t.device, dtype=torch.bfloat16, generator=gen).mul_(std)
        part.copy_(r.clamp_(-448, 448).to(part.dtype) if part.dtype == torch.float8_e4m3fn else r)


def synthetic_model(cfg: ModelConfig, build: BuildConfig, rank: int, device: str | torch.device,
                    seed: int = 0) -> Llama4ForCausalLM:
    device = torch.device(device)
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg, model_spec(build, rank))
    model = model.to_empty(device=device)
    model.rotary_emb.inv_freq.copy_(rope_inv_freq(cfg))  # derived buffer: to_empty left it undefined
    gen = torch.Generator(device=device).manual_seed(seed + 1000 * rank)
    shared = torch.Generator(device=device).manual_seed(seed)  # replicated tensors: equal on every rank
    fill_synthetic(dict(model.named_parameters()), gen, shared)
    return model.eval()


def fill_synthetic(params: dict[str, torch.nn.Parameter], gen: torch.Generator,
                   shared: torch.Generator | None = None) -> None:
    """Random values by parameter name and dtype (norms 1, FP8 weights with their scales, the rest scaled by
    fan-in); `shared` draws the router, which every rank must hold alike."""
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif p.dtype == torch.float8_e4m3fn:
                _fill_normal(p, FP8_SPREAD, gen)
            elif name.endswith("weight_scale"):
                weight = params[name[: -len("_scale")] if name.endswith(".weight_scale") else name[: -len("_weight_scale")]]
                p.fill_(1.0 / (FP8_SPREAD * math.sqrt(weight.shape[-1])))
            elif name.endswith("input_scale") or name.endswith("k_scale") or name.endswith("v_scale"):
                p.fill_(ACT_AMAX / 448.0)
            elif name == "embed_tokens.weight":
                _fill_normal(p, 1.0, gen)
            elif ".router." in name:  # replicated: every rank must route a token to the same experts
                _fill_normal(p, 1.0 / math.sqrt(p.shape[-1]), shared or gen)
            else:  # high-precision weights [out, in] (lm_head, unquantized linears)
                _fill_normal(p, 1.0 / math.sqrt(p.shape[-1]), gen)
