"""A decoder layer after its attention kernel as the stages of one persistent launch (maverick_plugins'
ChainStage): o_proj plus the residual stream, the FFN with its norm and residual, then the next layer's qkv
of its normed input. So a layer at batch 1 would be two launches, attention and this chain, where today's
step launches about eight. Inputs of the chain: the attention output [q_size] (input 0, stage index -1) and
the residual stream [hidden] (input 1, index -2).

One rank with no all-reduce between the stages (one-rank mode or TP 1): the fused all-reduce would have to
become tiles of the chain for real tensor parallelism. FP8 linears with static input scales and routed
experts with ModelOpt's per-tensor scales, top-1, every expert on this rank; anything else is refused with
the reason."""
from __future__ import annotations

import torch

from maverick.distributed import world_size
from maverick_plugins.persistent import ChainStage, persistent_chains


def _rows(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A weight's scales, one per output row (ModelOpt's per-tensor scalar repeated)."""
    return scale.float().expand(shape) if scale.numel() == 1 else scale.float().reshape(shape)


def _linear(lin, **kw) -> ChainStage:
    if not getattr(lin, "fp8", False):
        raise ValueError(f"the persistent layer tail takes FP8 linears; {type(lin).__name__} holds "
                         f"{lin.weight.dtype}")
    return ChainStage(lin.weight, _rows(lin.weight_scale, lin.weight.shape[:1]), lin.input_scale, **kw)


def layer_tail_stages(layer, next_layer=None) -> list[ChainStage]:
    """The stages of `layer` (a Llama4DecoderLayer) after attention; with next_layer, its qkv at the end
    (the chain's output), else the residual stream after the FFN."""
    attn, ffn = layer.self_attn, layer.feed_forward
    post = layer.post_attention_layernorm.weight
    stages = [_linear(attn.o_proj, input_from=-1, residual_from=-2)]  # h = x + o_proj(o)
    if layer.is_moe:
        if ffn.top_k != 1 or ffn.experts_fp8 != "tensor" or ffn.expert_offset or \
                ffn.local_experts != ffn.router.weight.shape[0]:
            raise ValueError(f"layer {layer.layer_id}: the persistent tail takes top-1 FP8 experts with per-tensor "
                             f"scales, all on this rank; got top_k={ffn.top_k}, experts_fp8={ffn.experts_fp8}, "
                             f"{ffn.local_experts} of {ffn.router.weight.shape[0]} experts here")
        ex, sh = ffn.experts, ffn.shared_expert
        gu, dn = ex.gate_up_proj, ex.down_proj
        stages += [ChainStage(ffn.router.weight, None, None, norm_weight=post, router=True, input_from=0),
                   _linear(sh.gate_up_proj, swiglu=True, norm_weight=post, input_from=0),
                   ChainStage(gu, _rows(ex.gate_up_proj_weight_scale, gu.shape[:2]), ex.gate_up_proj_input_scale,
                              swiglu=True, norm_weight=post, input_from=0, experts_from=1, scored=True),
                   _linear(sh.down_proj, input_from=2, residual_from=0),
                   ChainStage(dn, _rows(ex.down_proj_weight_scale, dn.shape[:2]), ex.down_proj_input_scale,
                              input_from=3, residual_from=4, experts_from=1)]
    else:
        stages += [_linear(ffn.gate_up_proj, swiglu=True, norm_weight=post, input_from=0),
                   _linear(ffn.down_proj, residual_from=0)]
    if next_layer is not None:
        stages.append(_linear(next_layer.self_attn.qkv_proj, norm_weight=next_layer.input_layernorm.weight,
                              input_from=len(stages) - 1))
    return stages


def layer_tails(layers, eps: float, dot: bool = False) -> list:
    """Every layer's tail as a chain (the last without a next qkv), built for one-token steps: the chains
    share the layers' weights (no second copy) and one workspace, each reading the residual stream where
    the previous layer's chain wrote it (its stage before the qkv). One rank only: the tail has no
    all-reduce yet. dot: their products on tensor cores."""
    if world_size() > 1:
        raise ValueError(f"MAVERICK_PERSISTENT=1 runs on one rank (one-rank mode or TP 1); this run has "
                         f"{world_size()} ranks")
    q, H = layers[0].self_attn.o_proj.weight.shape[1], layers[0].post_attention_layernorm.weight.numel()
    stages = [layer_tail_stages(layer, nxt) for layer, nxt in zip(layers, list(layers[1:]) + [None])]
    return persistent_chains(stages, eps, (q, H), carry=(1, -2), share_weights=True, dot=dot)
