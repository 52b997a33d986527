"""Llama 4 MoE block: sigmoid top-k router scaling the expert input, routed experts, shared expert.

Sharding: experts split over ep_size groups, each expert's intermediate dim over tp_size/ep_size
ranks; the shared expert over tp_size. Every rank returns a partial sum that the decoder layer's one
all-reduce completes (routed and shared together: one collective per FFN).
"""
from __future__ import annotations

import torch
from torch import nn

import maverick_plugins as ops
from maverick.config import ModelConfig, divide

from .mlp import Llama4MLP


class Llama4MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp_size: int, tp_rank: int, ep_size: int, dtype: torch.dtype,
                 fp8: bool = False, experts_fp8: str | None = None):
        super().__init__()
        E, H = cfg.num_local_experts, cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.local_experts = divide(E, ep_size, "num_local_experts (per ep_size)")
        moe_tp = tp_size // ep_size
        self.local_intermediate = divide(cfg.intermediate_size, moe_tp, "intermediate_size (per tp/ep)")
        self.expert_offset = (tp_rank // moe_tp) * self.local_experts
        I = self.local_intermediate
        # The router stays in the compute dtype (as in TensorRT-LLM and ModelOpt's defaults).
        self.router = nn.Module()
        self.router.weight = nn.Parameter(torch.empty(E, H, dtype=dtype), requires_grad=False)
        self.experts = nn.Module()
        wdt = torch.float8_e4m3fn if experts_fp8 else dtype
        self.experts.gate_up_proj = nn.Parameter(torch.empty(self.local_experts, 2 * I, H, dtype=wdt),
                                                 requires_grad=False)
        self.experts.down_proj = nn.Parameter(torch.empty(self.local_experts, H, I, dtype=wdt),
                                              requires_grad=False)
        self.experts_fp8 = experts_fp8
        self.dynamic_inputs = experts_fp8 == "channel"
        if experts_fp8:  # ModelOpt: one scalar per tensor for all experts; Meta: per output channel
            s13 = (self.local_experts, 2 * I) if self.dynamic_inputs else ()
            s2 = (self.local_experts, H) if self.dynamic_inputs else ()
            for name, shape in (("gate_up_proj_weight_scale", s13), ("down_proj_weight_scale", s2)):
                setattr(self.experts, name, nn.Parameter(torch.empty(shape), requires_grad=False))
            if not self.dynamic_inputs:  # static per-tensor input scales (ModelOpt)
                for name in ("gate_up_proj_input_scale", "down_proj_input_scale"):
                    setattr(self.experts, name, nn.Parameter(torch.empty(()), requires_grad=False))
        self.shared_expert = Llama4MLP(H, cfg.intermediate_size, tp_size, dtype, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        scales = ()
        if self.experts_fp8:
            in13 = None if self.dynamic_inputs else ex.gate_up_proj_input_scale
            in2 = None if self.dynamic_inputs else ex.down_proj_input_scale
            scales = (ex.gate_up_proj_weight_scale, in13, ex.down_proj_weight_scale, in2)
        experts = (ex.gate_up_proj, ex.down_proj, self.expert_offset, *scales)
        gu, dn = self.shared_expert.gate_up_proj, self.shared_expert.down_proj
        if self.experts_fp8 and gu.fp8:  # router, experts and shared expert in one op (2-3 launches at decode)
            return ops.moe_block(x, self.router.weight, self.top_k, *experts, gu.weight, gu.weight_scale,
                                 gu.input_scale, dn.weight, dn.weight_scale, dn.input_scale)
        top_ids, top_scores = ops.moe_router(x, self.router.weight, self.top_k)
        return self.shared_expert(x) + ops.moe_experts(x, top_ids, top_scores, *experts)
