"""A chain of one-token GEMV stages, the decoder layer's ops around them folded in (RMSNorm of the input,
SwiGLU, router logits and the top-1 expert's weights, the residual add): the stages' description and the
reference a persistent decode kernel (kernels/persistent_chain.py) must meet."""
from typing import NamedTuple

import torch

from .activation import swiglu
from .fp8 import fp8_linear_ref
from .norm import rms_norm_ref


class ChainStage(NamedTuple):
    """One GEMV of the chain.
    weight: [N, K] e4m3 (swiglu: [2N, K], gate rows then up rows; experts_from: [E, N or 2N, K]; router:
    [E, K] bf16). row_scales: [N] (or [2N]; [E, N or 2N] with experts) fp32; input_scale: the static input
    scale (one element; unused by a router). norm_weight [K]: RMSNorm the input with it first.
    input_from / residual_from: the stage whose output is the input / is added to the output (-1 - i: the
    chain's input i); input_from None: the stage before (the first stage: input 0). experts_from: the router
    stage whose top-1 picks the expert; scored: the input times that pick's sigmoid score."""
    weight: torch.Tensor
    row_scales: torch.Tensor | None
    input_scale: torch.Tensor | None
    swiglu: bool = False
    norm_weight: torch.Tensor | None = None
    residual_from: int | None = None
    input_from: int | None = None
    router: bool = False
    experts_from: int | None = None
    scored: bool = False

    @property
    def k(self) -> int:
        return self.weight.shape[-1]

    @property
    def rows(self) -> int:
        return self.weight.shape[-2]

    @property
    def n_out(self) -> int:
        return self.rows // (2 if self.swiglu else 1)


def checked_stages(stages, inputs: tuple[int, ...] | None = None) -> list[ChainStage]:
    """The stages as ChainStage, input_from filled in; a clear error naming the stage and field where one
    cannot be built. inputs: the sizes of the chain's inputs (by default one, the first stage's K)."""
    if not stages:
        raise ValueError("a chain needs at least one stage")
    out, inputs = [], inputs or (ChainStage(*stages[0]).k,)

    def size(i, src):  # elements of stage src's output (-1 - j: the chain's input j)
        return inputs[-1 - src] if src < 0 else out[src].n_out

    for i, st in enumerate(stages):
        st = ChainStage(*st)
        if st.input_from is None:
            st = st._replace(input_from=i - 1)  # the first stage: input 0 (-1)
        w, ws, xs = st.weight, st.row_scales, st.input_scale
        experts = st.experts_from is not None
        if st.router:
            if w.dtype != torch.bfloat16 or w.dim() != 2 or st.swiglu or experts or st.residual_from is not None:
                raise ValueError(f"stage {i}: a router takes a bf16 weight [E, K] and nothing else but a norm, got "
                                 f"{w.dtype} {list(w.shape)}")
        elif (w.dtype != torch.float8_e4m3fn or w.dim() != (3 if experts else 2) or ws is None
              or ws.shape != w.shape[:-1] or xs is None or xs.numel() != 1):
            want = "[E, N, K] with [E, N]" if experts else "[N, K] with [N]"
            raise ValueError(f"stage {i}: expected an e4m3 weight {want} row scales and one input scale, got "
                             f"{w.dtype} {list(w.shape)}, row scales {None if ws is None else list(ws.shape)}, "
                             f"{None if xs is None else xs.numel()} input scales")
        if st.swiglu and st.rows % 2:
            raise ValueError(f"stage {i}: a SwiGLU weight stacks gate and up rows, got an odd {st.rows} rows")
        if not -len(inputs) <= st.input_from < i:
            raise ValueError(f"stage {i}: input_from={st.input_from}: expected an earlier stage or one of the "
                             f"{len(inputs)} inputs (-1 ... {-len(inputs)})")
        if st.k != size(i, st.input_from):
            raise ValueError(f"stage {i}: K={st.k} but its input (stage {st.input_from}) has "
                             f"{size(i, st.input_from)} elements")
        if st.norm_weight is not None and st.norm_weight.numel() != st.k:
            raise ValueError(f"stage {i}: norm weight of {st.norm_weight.numel()} elements for K={st.k}")
        if st.residual_from is not None:
            rf = st.residual_from
            if st.swiglu or not -len(inputs) <= rf < i:
                raise ValueError(f"stage {i}: residual_from={rf}: expected an earlier stage or an input "
                                 f"(-1 ... {-len(inputs)}), and no SwiGLU in the same stage")
            if size(i, rf) != st.n_out:
                raise ValueError(f"stage {i}: residual from stage {rf} has {size(i, rf)} elements, "
                                 f"the output {st.n_out}")
        if experts:
            ef = st.experts_from
            if not 0 <= ef < i or not out[ef].router or out[ef].rows != w.shape[0]:
                raise ValueError(f"stage {i}: experts_from={ef}: expected an earlier router stage with "
                                 f"{w.shape[0]} logits")
        if st.scored and not experts:
            raise ValueError(f"stage {i}: scored needs experts_from (the score is the pick's)")
        out.append(st)
    return out


def gemv_chain_ref(x, stages, eps: float = 1e-5) -> list[torch.Tensor]:
    """Specification: the reference ops a decoder layer runs, one after the other, in bf16: rms_norm_ref,
    fp8_linear_ref (SwiGLU in fp32 on its output), moe_router_ref's logits, pick and score, the residual
    add. x: the chain's input, or a sequence of its inputs. Every stage's output, the last one's last."""
    xs = [t.reshape(1, -1).to(torch.bfloat16) for t in ([x] if isinstance(x, torch.Tensor) else x)]
    outs = []
    at = lambda src: xs[-1 - src] if src < 0 else outs[src]  # noqa: E731
    for st in checked_stages(stages, tuple(t.shape[1] for t in xs)):
        y = at(st.input_from)
        if st.norm_weight is not None:
            y = rms_norm_ref(y, st.norm_weight.to(torch.bfloat16), eps)
        if st.router:
            outs.append(y @ st.weight.t())
            continue
        w, ws = st.weight, st.row_scales
        if st.experts_from is not None:
            logits = outs[st.experts_from]
            e = int(torch.argmax(logits.float()))  # the first of equal maxima: the lowest id
            w, ws = w[e], ws[e]
            if st.scored:
                y = (y * torch.sigmoid(logits[0, e].float()).to(torch.bfloat16))
        if st.swiglu:
            y = swiglu(fp8_linear_ref(y, w, ws, st.input_scale, torch.float32)).to(torch.bfloat16)
        else:
            y = fp8_linear_ref(y, w, ws, st.input_scale, torch.bfloat16)
        if st.residual_from is not None:
            y = at(st.residual_from) + y
        outs.append(y)
    return [o.reshape(-1) for o in outs]


def check_inputs(xs, inputs: tuple[int, ...]) -> None:
    """A chain's call: one tensor per input, of its size."""
    if len(xs) != len(inputs) or any(x.numel() != k for x, k in zip(xs, inputs)):
        raise ValueError(f"the chain's inputs have {list(inputs)} elements, got {[list(x.shape) for x in xs]}")


class ReferenceChain:
    """GemvChain's interface over gemv_chain_ref (CPU, or wherever the kernel does not run)."""

    def __init__(self, stages, eps: float = 1e-5, inputs: tuple[int, ...] | None = None):
        self.stages, self.eps = checked_stages(stages, inputs), eps
        self.inputs = tuple(inputs or (self.stages[0].k,))
        self.outs: list[torch.Tensor] = []

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        check_inputs(xs, self.inputs)
        self.outs = gemv_chain_ref(xs, self.stages, self.eps)
        return self.outs[-1]

    def output(self, stage: int) -> torch.Tensor:
        return self.outs[stage]


def persistent_chains(stage_lists, eps: float, inputs: tuple[int, ...], carry: tuple[int, int] | None = None,
                      share_weights: bool = False, dot: bool = False) -> list:
    """One chain per stage list, as persistent launches on CUDA (kernels/persistent_chain.py), else their
    reference. On CUDA the chains share one workspace, and with carry = (i, s) chain j's input i is chain
    j - 1's stage s output, read where it lies (a decoder layer's residual stream: no copy between layers).
    share_weights: the stages' weights become views of the chains' packed buffers. dot: the kernels' products on
    tensor cores (GemvChain's dot)."""
    if not stage_lists[0] or not ChainStage(*stage_lists[0][0]).weight.is_cuda:
        return [ReferenceChain(stages, eps, inputs) for stages in stage_lists]
    from .kernels.persistent_chain import GemvChain, footprint

    dev = ChainStage(*stage_lists[0][0]).weight.device
    workspace = torch.zeros(sum(footprint(st, inputs) for st in stage_lists), dtype=torch.bfloat16, device=dev)
    chains, start = [], 0
    for stages in stage_lists:
        input_at = ()
        if carry is not None and chains:
            i, s = carry
            input_at = tuple(chains[-1].spans[s][0] if j == i else None for j in range(len(inputs)))
        chains.append(GemvChain(stages, eps=eps, inputs=inputs, share_weights=share_weights, workspace=workspace,
                                start=start, input_at=input_at, dot=dot))
        start = chains[-1].end
    return chains
