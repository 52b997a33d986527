"""One rank's engine tensors straight from a checkpoint (the builder's core, also used by tests)."""
from __future__ import annotations

from typing import Iterator

import torch

from maverick.checkpoint import CheckpointReader
from maverick.checkpoint.quant_formats import EXPERT_RULES, LINEAR_RULES
from maverick.config import BuildConfig
from maverick.layers.embedding import fp8_lm_head_rows
from maverick.models import Llama4ForCausalLM, ModelSpec
from maverick_plugins import quantize_fp8_dynamic_per_token

from .shard import RankLayout, iter_entries, shard_tensor
from .spec import model_spec


def iter_rank_tensors(reader: CheckpointReader, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(engine name, tensor) for one rank, FP8 scales included, in the layout the model reads."""
    lay = RankLayout(reader.config, spec.tp_size, spec.tp_rank, spec.ep_size)
    f32 = torch.float32
    for name, sources, rule in iter_entries(reader.config):
        if name == "lm_head.weight" and spec.lm_head_fp8:  # rows quantized here, from the checkpoint's values
            w = reader.get(sources[0])
            yield from _fp8_rows(name, shard_tensor(rule, [w], lay, w.dtype))
            continue
        yield name, shard_tensor(rule, [reader.get(s) for s in sources], lay, spec.dtype)
        if rule in LINEAR_RULES and spec.fp8:
            base, bases = name[: -len(".weight")], [s[: -len(".weight")] for s in sources]
            scales = [reader.get(b + ".weight_scale").float() for b in bases]
            if len(sources) == 1:
                yield base + ".weight_scale", scales[0]
            else:  # fused: every output row keeps its own segment's scale (exact, no requantization)
                rows = [torch.full((reader.shape(s)[0],), float(sc)) for s, sc in zip(sources, scales)]
                yield base + ".weight_scale", shard_tensor(rule, rows, lay, f32)
            # q/k/v (and gate/up) read the same activation, calibrated once: the scales agree
            yield base + ".input_scale", torch.stack([reader.get(b + ".input_scale").float() for b in bases]).max()
        elif rule in EXPERT_RULES and spec.experts_fp8 == "tensor":
            yield name + "_weight_scale", reader.get(sources[0] + "_weight_scale").float()
            yield name + "_input_scale", reader.get(sources[0] + "_input_scale").float()
        elif rule in EXPERT_RULES and spec.experts_fp8 == "channel":
            yield name + "_weight_scale", shard_tensor(rule + "_scale", [reader.get(sources[0] + "_weight_scale")],
                                                       lay, f32)
    if spec.fp8_kv_cache:
        for i in range(reader.config.num_hidden_layers):
            p = f"model.layers.{i}.self_attn."
            yield f"layers.{i}.self_attn.k_scale", reader.get(p + "k_proj.k_scale").float()
            yield f"layers.{i}.self_attn.v_scale", reader.get(p + "v_proj.v_scale").float()


def _fp8_rows(name: str, w: torch.Tensor, chunk: int = 8192) -> Iterator[tuple[str, torch.Tensor]]:
    """w [rows, K] -> (name, e4m3 rows), (scale name, [rows] fp32 amax / 448), a chunk of rows at a time
    (Maverick's lm_head at tp 1 is 4 GB in fp32), zero rows appended up to fp8_lm_head_rows."""
    w = torch.cat([w, w.new_zeros(fp8_lm_head_rows(w.shape[0]) - w.shape[0], w.shape[1])])
    parts = [quantize_fp8_dynamic_per_token(w[i:i + chunk]) for i in range(0, w.shape[0], chunk)]
    yield name, torch.cat([p[0] for p in parts])
    yield name + "_scale", torch.cat([p[1] for p in parts]).reshape(-1)


def load_model_from_checkpoint(reader: CheckpointReader, spec: ModelSpec,
                               device: str | torch.device = "cpu") -> Llama4ForCausalLM:
    """Build one rank's model and fill it from the checkpoint (no engine directory involved).
    Quantization follows the checkpoint; spec gives the parallel layout and the compute dtype."""
    build = BuildConfig(tp_size=spec.tp_size, ep_size=spec.ep_size, dtype=str(spec.dtype).removeprefix("torch."),
                        quant=reader.quant.build_quant(),
                        lm_head_quant_algo="FP8_PER_CHANNEL_PER_TOKEN" if spec.lm_head_fp8 else None)
    spec = model_spec(build, spec.tp_rank)
    with torch.device("meta"):
        model = Llama4ForCausalLM(reader.config, spec)
    state = dict(iter_rank_tensors(reader, spec))
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device)
