"""Top-k sigmoid router and routed experts (reference).

Llama 4 scales the expert INPUT by sigmoid(router logit); SwiGLU is not homogeneous, so the score
cannot move to the output. This reference runs every local expert densely with a zero input for
tokens not routed to it (SwiGLU(0) = 0): exact, simple, and the spec the fast kernels must meet.
"""
import torch

from .activation import swiglu
from . import dispatch
from .fp8 import fp8_linear, fp8_linear_ref, fp8_linear_swiglu, quantize_fp8


def moe_router(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits in x's dtype, top-k ids [T, k] and sigmoid scores [T, k] (in x's dtype)."""
    kind = dispatch.router(x)
    if kind == "gemv_topk":  # logits and top-k in one launch
        from .kernels.small_ops import router_triton

        return router_triton(x.contiguous(), router_weight, top_k)
    if kind == "topk":  # top-k and sigmoid in one launch instead of three
        from .kernels.small_ops import router_topk_triton

        return router_topk_triton(x @ router_weight.t().to(x.dtype), top_k)
    return moe_router_ref(x, router_weight, top_k)


def moe_router_ref(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = x @ router_weight.t().to(x.dtype)
    top_vals, top_ids = torch.topk(logits, top_k, dim=-1)
    return top_ids, torch.sigmoid(top_vals.float()).to(x.dtype)


def _expert_linear(x: torch.Tensor, w: torch.Tensor, w_scale, in_scale, out_dtype,
                   fp8_gemm=fp8_linear_ref) -> torch.Tensor:
    if w.dtype == torch.float8_e4m3fn:
        return fp8_gemm(x, w, w_scale, in_scale, out_dtype)
    return x @ w.t()


def moe_experts(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, expert_offset: int = 0,
                gate_up_scale: torch.Tensor | None = None, gate_up_input_scale: torch.Tensor | None = None,
                down_scale: torch.Tensor | None = None,
                down_input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts, as dispatch.moe chooses: only the chosen experts' FP8 rows for a few tokens; for many
    (prefill, large decode batches) each expert on its own tokens only; else the reference."""
    kind = dispatch.moe(x, gate_up, down)
    if kind == "gemv":
        from .kernels.moe_gemv import moe_experts_gemv

        return moe_experts_gemv(x.contiguous(), top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale,
                                gate_up_input_scale, down_scale, down_input_scale)
    if kind == "grouped_mm":
        return moe_experts_grouped_mm(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale,
                                      gate_up_input_scale, down_scale, down_input_scale)
    if kind == "grouped":
        return moe_experts_grouped(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale,
                                   gate_up_input_scale, down_scale, down_input_scale)
    return moe_experts_ref(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale,
                           gate_up_input_scale, down_scale, down_input_scale)


def moe_ffn(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
            gate_up: torch.Tensor, down: torch.Tensor, expert_offset: int,
            gate_up_scale: torch.Tensor, gate_up_input_scale: torch.Tensor | None,
            down_scale: torch.Tensor, down_input_scale: torch.Tensor | None,
            shared_gate_up: torch.Tensor, shared_gate_up_scale: torch.Tensor, shared_gate_up_input_scale: torch.Tensor,
            shared_down: torch.Tensor, shared_down_scale: torch.Tensor,
            shared_down_input_scale: torch.Tensor) -> torch.Tensor:
    """The whole MoE FFN after the router: shared_expert(x) + routed experts, FP8 experts and an FP8 shared
    expert (gate_up [2Is, H] with row scales, down [H, Is], static input scales). For a few tokens on CUDA
    one kernel pair computes both (the shared expert as one more row per token: 5 launches -> 2)."""
    if dispatch.moe(x, gate_up, down) == "gemv":
        from .kernels.moe_gemv import moe_experts_gemv

        return moe_experts_gemv(x.contiguous(), top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale,
                                gate_up_input_scale, down_scale, down_input_scale,
                                shared=(shared_gate_up, shared_gate_up_scale, shared_gate_up_input_scale,
                                        shared_down, shared_down_scale, shared_down_input_scale))
    routed = moe_experts(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale, gate_up_input_scale,
                         down_scale, down_input_scale)
    h = fp8_linear_swiglu(x, shared_gate_up, shared_gate_up_scale, shared_gate_up_input_scale, x.dtype)
    return fp8_linear(h, shared_down, shared_down_scale, shared_down_input_scale, x.dtype) + routed


def moe_block(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, gate_up: torch.Tensor, down: torch.Tensor,
              expert_offset: int, gate_up_scale: torch.Tensor, gate_up_input_scale: torch.Tensor | None,
              down_scale: torch.Tensor, down_input_scale: torch.Tensor | None, shared_gate_up: torch.Tensor,
              shared_gate_up_scale: torch.Tensor, shared_gate_up_input_scale: torch.Tensor, shared_down: torch.Tensor,
              shared_down_scale: torch.Tensor, shared_down_input_scale: torch.Tensor) -> torch.Tensor:
    """The router, then moe_ffn (arguments as moe_router's and moe_ffn's: FP8 routed and shared experts). One
    token, top-1, on CUDA: the router's launch only writes the logits, and both MoE passes pick the expert from
    them in every program: no pick step by the router's last program (an arrival counter and a read-back)."""
    shared = (shared_gate_up, shared_gate_up_scale, shared_gate_up_input_scale, shared_down, shared_down_scale,
              shared_down_input_scale)
    T = x.shape[0]
    if dispatch.moe_block_fused(x, top_k, fp8=gate_up.dtype == shared_gate_up.dtype == torch.float8_e4m3fn):
        from .kernels.moe_gemv import moe_experts_gemv
        from .kernels.small_ops import router_triton

        x = x.contiguous()
        logits = router_triton(x, router_weight, 1, pick=False)
        ids = torch.empty((T, 1), dtype=torch.int64, device=x.device)
        scores = torch.empty((T, 1), dtype=x.dtype, device=x.device)
        return moe_experts_gemv(x, ids, scores, gate_up, down, expert_offset, gate_up_scale, gate_up_input_scale,
                                down_scale, down_input_scale, shared=shared, router_logits=logits)
    top_ids, top_scores = moe_router(x, router_weight, top_k)
    return moe_ffn(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale, gate_up_input_scale,
                   down_scale, down_input_scale, *shared)


def moe_block_ref(x, router_weight, top_k, *ffn_args) -> torch.Tensor:
    return moe_ffn_ref(x, *moe_router_ref(x, router_weight, top_k), *ffn_args)


def moe_ffn_ref(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                gate_up: torch.Tensor, down: torch.Tensor, expert_offset: int,
                gate_up_scale: torch.Tensor, gate_up_input_scale: torch.Tensor | None,
                down_scale: torch.Tensor, down_input_scale: torch.Tensor | None,
                shared_gate_up: torch.Tensor, shared_gate_up_scale: torch.Tensor,
                shared_gate_up_input_scale: torch.Tensor, shared_down: torch.Tensor,
                shared_down_scale: torch.Tensor, shared_down_input_scale: torch.Tensor) -> torch.Tensor:
    """Specification of moe_ffn: the shared expert's output (rounded to x's dtype) plus the routed one."""
    routed = moe_experts_ref(x, top_ids, top_scores, gate_up, down, expert_offset, gate_up_scale,
                             gate_up_input_scale, down_scale, down_input_scale)
    h = swiglu(fp8_linear_ref(x, shared_gate_up, shared_gate_up_scale, shared_gate_up_input_scale, x.dtype))
    return fp8_linear_ref(h, shared_down, shared_down_scale, shared_down_input_scale, x.dtype) + routed


def _grouped_linear(xs: torch.Tensor, offs: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    in_scale: torch.Tensor | None) -> torch.Tensor:
    """Rows of xs sorted by expert (expert e owns rows offs[e-1]:offs[e]) times w[e]^T, in FP8 with
    row-wise scales: the activation's (static or per token) and the weight's per output channel."""
    E, N, _ = w.shape
    x8, sa = quantize_fp8(xs, in_scale)
    sa = sa.reshape(-1).expand(xs.shape[0]).contiguous()  # one scale per row (a static one repeated)
    sb = w_scale.float().reshape(-1, N) if w_scale.numel() > 1 else w_scale.float().reshape(1, 1)
    sb = sb.expand(E, N).contiguous()
    return torch._scaled_grouped_mm(x8, w.transpose(1, 2), sa, sb, offs=offs, out_dtype=torch.bfloat16)


def moe_experts_grouped_mm(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                           gate_up: torch.Tensor, down: torch.Tensor, expert_offset: int = 0,
                           gate_up_scale: torch.Tensor | None = None,
                           gate_up_input_scale: torch.Tensor | None = None,
                           down_scale: torch.Tensor | None = None,
                           down_input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as moe_experts_ref with two grouped FP8 GEMMs (torch._scaled_grouped_mm): the
    T x k (token, expert) pairs are sorted by expert on the GPU, group ends come from a scatter-add,
    pairs routed to experts held elsewhere sort last, past the final group, and are dropped. No
    shape depends on the routing, so a decode step of any batch size can be captured."""
    T, H = x.shape
    E = gate_up.shape[0]
    k = top_ids.shape[1]
    ids = top_ids.reshape(-1) - expert_offset
    local = (ids >= 0) & (ids < E)
    ids = torch.where(local, ids, E)  # E: the "elsewhere" group, after every local one
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, ids, torch.ones_like(ids, dtype=torch.int32))
    offs = torch.cumsum(counts[:E], 0, dtype=torch.int32)
    token = order // k
    xs = x[token] * top_scores.reshape(-1)[order, None]  # the score scales the expert input, in x's dtype
    h = swiglu(_grouped_linear(xs, offs, gate_up, gate_up_scale, gate_up_input_scale))
    y = _grouped_linear(h, offs, down, down_scale, down_input_scale)
    y = torch.where(local[order, None], y, torch.zeros((), dtype=y.dtype, device=y.device))  # rows past offs[-1]
    out = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, y.float()).to(x.dtype)


def moe_experts_grouped(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                        gate_up: torch.Tensor, down: torch.Tensor, expert_offset: int = 0,
                        gate_up_scale: torch.Tensor | None = None, gate_up_input_scale: torch.Tensor | None = None,
                        down_scale: torch.Tensor | None = None,
                        down_input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as moe_experts_ref, computing each local expert on the tokens routed to it only
    (tokens sorted by expert; one FP8 GEMM pair per expert that has tokens). The per-expert token
    counts come to the host, so this is for eager prefill, never inside a CUDA graph."""
    T, H = x.shape
    E = gate_up.shape[0]
    k = top_ids.shape[1]
    ids = top_ids.reshape(-1) - expert_offset
    scores = top_scores.reshape(-1)
    token = torch.arange(T, device=x.device).repeat_interleave(k)
    local = (ids >= 0) & (ids < E)
    ids, scores, token = ids[local], scores[local], token[local]
    order = torch.argsort(ids, stable=True)
    ids, scores, token = ids[order], scores[order], token[order]
    counts = torch.bincount(ids, minlength=E).tolist()
    out = torch.zeros((T, H), dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = slice(start, start + n)
        start += n
        xe = x[token[sel]] * scores[sel, None]  # the score scales the expert input, in x's dtype
        h = swiglu(_expert_linear(xe, gate_up[e], _pick(gate_up_scale, e), gate_up_input_scale, x.dtype, fp8_linear))
        y = _expert_linear(h, down[e], _pick(down_scale, e), down_input_scale, x.dtype, fp8_linear)
        out.index_add_(0, token[sel], y.float())
    return out.to(x.dtype)


def moe_experts_ref(x: torch.Tensor, top_ids: torch.Tensor, top_scores: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor, expert_offset: int = 0,
                    gate_up_scale: torch.Tensor | None = None, gate_up_input_scale: torch.Tensor | None = None,
                    down_scale: torch.Tensor | None = None,
                    down_input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over k of expert[top_ids[:, k]](top_scores[:, k] * x) for the experts held here.

    x [T, H]; gate_up [E_local, 2I, H] (gate rows first); down [E_local, H, I]; this rank holds
    experts expert_offset .. expert_offset + E_local - 1. FP8 weights take per-tensor scales
    (scalars shared by all experts) or per-channel scales [E_local, N].
    """
    E = gate_up.shape[0]
    local_ids = top_ids - expert_offset
    # weight[t, e]: the score with which token t enters local expert e (0 if not routed there)
    onehot = (local_ids[:, :, None] == torch.arange(E, device=x.device)[None, None, :]).to(x.dtype)
    weight = (onehot * top_scores[:, :, None]).sum(dim=1)  # [T, E]
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in range(E):  # static loop over local experts: capturable, no data-dependent shapes
        xe = x * weight[:, e:e + 1]
        h = swiglu(_expert_linear(xe, gate_up[e], _pick(gate_up_scale, e), gate_up_input_scale, x.dtype))
        out += _expert_linear(h, down[e], _pick(down_scale, e), down_input_scale, x.dtype).float()
    return out.to(x.dtype)


def _pick(scale: torch.Tensor | None, e: int):
    if scale is None or scale.dim() == 0:
        return scale
    return scale[e]
