"""The floors a step is measured against: the bytes it must read at the measured HBM bandwidth, and the FLOPs
it must do at the measured dense FP8 peak. A step cannot beat the larger of the two.

Bytes: every weight once, routed experts only as many as the step's tokens select in expectation (uniform
routing: E * (1 - (1 - 1/E)^(tokens * top_k)) distinct experts), the KV of each sequence read once, the
embedding rows of its tokens. FLOPs: 2 per weight a token uses (top_k experts' slices a token, lm_head only for
the rows whose logits are computed) and attention's 4 * heads * head_dim per (query, key) pair, keys capped at
the chunk in local layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maverick.builder.memory_plan import kv_bytes_per_token
from maverick.config import BuildConfig, ModelConfig

from .timing import median_ms


@dataclass(frozen=True)
class StepWork:
    bytes: float
    flops: float

    def floor_ms(self, bandwidth: float, peak_flops: float | None) -> tuple[float, float]:
        """(bytes floor, FLOP floor) in ms; the FLOP floor is 0 without a measured peak."""
        return self.bytes / bandwidth * 1e3, (self.flops / peak_flops * 1e3 if peak_flops else 0.0)


def step_work(model, cfg: ModelConfig, build: BuildConfig, seqs: int, new_tokens: int, context: int,
              logits_rows: int | None = None) -> StepWork:
    """One rank's bytes and FLOPs for a step of `seqs` sequences of `new_tokens` new tokens each after
    `context` cached ones (decode: new_tokens 1); logits for logits_rows rows (default: one per sequence)."""
    tokens = seqs * new_tokens
    rows = seqs if logits_rows is None else logits_rows
    e_all, top_k = cfg.num_local_experts, cfg.num_experts_per_tok
    nbytes = flops = 0.0
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        if name == "embed_tokens.weight":
            nbytes += tokens * t.shape[1] * t.element_size()
            continue
        if t.dim() < 2 or name.endswith("scale"):  # norms, scales, biases: bytes only
            nbytes += n
            continue
        if ".experts." in name:
            e_local = t.shape[0]
            selected = e_all * (1 - (1 - 1 / e_all) ** (tokens * top_k))  # expected distinct, all ranks' experts
            nbytes += n * min(selected * e_local / e_all, e_local) / e_local
            flops += 2 * t.numel() / e_local * tokens * top_k * e_local / e_all
        elif name.startswith("lm_head."):
            nbytes += n
            flops += 2 * t.numel() * rows
        else:
            nbytes += n
            flops += 2 * t.numel() * tokens
    g, loc = kv_bytes_per_token(cfg, build)
    end = context + new_tokens
    nbytes += seqs * (g * end + loc * min(end, cfg.attention_chunk_size))
    keys = context + (new_tokens + 1) / 2  # a query's keys on average (causal within the new tokens)
    per_pair = 4 * cfg.local_heads(build.tp_size) * cfg.head_dim
    flops += tokens * per_pair * (len(cfg.nope_layer_ids) * keys
                                  + len(cfg.rope_layer_ids) * min(keys, cfg.attention_chunk_size))
    return StepWork(nbytes, flops)


def fp8_peak_flops(n: int = 8192) -> float:
    """FLOP/s of a dense e4m3 GEMM n x n x n (torch._scaled_mm, bf16 out), median over CUDA-graph replays."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")

    def mm():
        return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    mm()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            mm()
    ms = median_ms(g.replay, iters=10) / 10
    return 2 * n ** 3 / (ms / 1e3)
