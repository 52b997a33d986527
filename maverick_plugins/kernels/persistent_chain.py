"""A chain of FP8 GEMVs as one persistent launch: tiles from a queue, each waiting on a counter for its input.

The first piece of a persistent decode kernel. A decode step at batch 1 is a chain of small weight
streams, and each launch pays a fixed ramp that PDL hides only in part: the 48-layer GEMV chain reached
44% of bandwidth at one H200 rank. Here the whole chain is one grid of about two programs an SM. A program
takes the next tile (ROWS weight rows of one stage) from a queue counter. It loads that tile's weights
first, since weights depend on nothing. Then it waits until every tile of the stage before has signalled,
reads that stage's output, and signals its own stage. So the next stage's weights stream in while the
current stage finishes, with no launch between them.

A stage may also do what the launches around a GEMV do in a decoder layer, so a dense MLP block (RMSNorm,
fc13 + SwiGLU, fc2, residual add) is two stages and no other launch:
- norm: RMSNorm the input with a weight first. Every tile recomputes the norm of the whole input (10 KB at
  hidden 5120, from L2) instead of waiting on a norm stage: no stage of one tile in the chain.
- swiglu: the weight is [gate; up] (2N rows) and the stage gives silu(gate x) * (up x). A tile's rows
  interleave gate and up rows, so every stage's tiles load the same ROWS rows of weights.
- residual: the output is an earlier stage's input plus the product (the residual stream).

Tiles are queued in stage order. A tile waits only on tiles that were taken before it, by programs that
are already running and never wait on later tiles, so the chain cannot deadlock whatever the grid size or
residency. The Triton interpreter (CPU) runs programs one after another and still completes: the first
program takes every tile in order. A residual stage reads a stage further back: that stage finished
before the stage it waits on started (each stage's tiles saw the one before complete).

The arithmetic is that of the launches it replaces: add_rms_norm's norm (fp32 sums, bf16 rounding, times
the weight), fp8_gemv's products (x quantized with the stage's static scale, exact e4m3 products, fp32 sums,
row scales, one token, SwiGLU in fp32) and the bf16 residual add. The specification is gemv_chain_ref.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .counters import last_to_arrive
from .e4m3 import to_e4m3
from .fp8_gemv import k_pieces
from .pdl import pdl_enter, pdl_launch

COLS = 10  # desc columns, see _chain_kernel
SWIGLU, RESIDUAL, NORM = 1, 2, 4  # stage flags


@triton.jit
def _times_weight(y, w):
    """bf16 y * bf16 w rounded to bf16, as the reference: the product is exact in fp32, so one rounding."""
    return (y.to(tl.float32) * w.to(tl.float32)).to(y.dtype)


@triton.jit
def _chain_kernel(w_ptr, ws_ptr, xs_ptr, g_ptr, act_ptr, desc_ptr, ctr_ptr, S, TOTAL, NPROG, eps,
                  ROWS: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, PDL: tl.constexpr):
    """desc: a row of COLS int64 a stage (weight offset, N out, K, input offset in act, row-scale offset,
    first tile, flags, output offset, residual offset, norm-weight offset). ctr: [0] the tile queue, [1]
    programs done, [2 + s] tiles of stage s done; the last program out sets them back to 0 (the next call
    and graph replay start from zero)."""
    pdl_enter(PDL)  # the first stage's input may be the previous kernel's output
    ka = tl.arange(0, KA)
    r = tl.arange(0, ROWS)
    t = tl.atomic_add(ctr_ptr, 1)
    while t < TOTAL:
        s = 0
        for i in range(1, S):  # this tile's stage: how many stages start at or before it
            s += (tl.load(desc_ptr + i * COLS + 5) <= t).to(tl.int32)
        d = desc_ptr + s * COLS
        w_off, n, k = tl.load(d + 0), tl.load(d + 1), tl.load(d + 2)
        x_off, sc_off, first = tl.load(d + 3), tl.load(d + 4), tl.load(d + 5)
        flags, out_off = tl.load(d + 6), tl.load(d + 7)
        sw = flags & SWIGLU  # 1: tile row r is gate (even r) or up (odd r) of output (r >> 1)
        j = (t - first) * (ROWS >> sw) + (r >> sw)  # the output each weight row feeds
        valid = j < n
        rows = w_off + ((r & sw) * n + j).to(tl.int64) * k
        # the tile's weights before the wait: nothing writes them
        wa = tl.load(w_ptr + rows[:, None] + ka[None, :], mask=valid[:, None] & (ka < k)[None, :], other=0.0)
        if KB > 0:
            kb = KA + tl.arange(0, KB)
            wb = tl.load(w_ptr + rows[:, None] + kb[None, :], mask=valid[:, None] & (kb < k)[None, :], other=0.0)
        ws = tl.load(ws_ptr + sc_off + (r & sw) * n + j, mask=valid, other=0.0)
        x_scale = tl.load(xs_ptr + s)
        if s > 0:  # every tile of the stage before: its output is this stage's input
            need = first - tl.load(desc_ptr + (s - 1) * COLS + 5)
            while tl.atomic_add(ctr_ptr + 2 + s - 1, 0, sem="acquire", scope="gpu") < need:
                pass
        # .cg: other programs wrote the input, past this SM's L1
        xa = tl.load(act_ptr + x_off + ka, mask=ka < k, other=0.0, cache_modifier=".cg")
        if KB > 0:
            xb = tl.load(act_ptr + x_off + kb, mask=kb < k, other=0.0, cache_modifier=".cg")
        if flags & NORM:  # add_rms_norm_row's arithmetic over both pieces
            fa = xa.to(tl.float32)
            ss = tl.sum(fa * fa, axis=0)
            if KB > 0:
                fb = xb.to(tl.float32)
                ss += tl.sum(fb * fb, axis=0)
            inv = tl.rsqrt(ss / k.to(tl.float32) + eps)
            g_off = tl.load(d + 9)
            xa = _times_weight((fa * inv).to(act_ptr.dtype.element_ty), tl.load(g_ptr + g_off + ka, mask=ka < k))
            if KB > 0:
                xb = _times_weight((fb * inv).to(act_ptr.dtype.element_ty),
                                   tl.load(g_ptr + g_off + kb, mask=kb < k, other=0.0))
        acc = tl.sum(wa.to(tl.float32) * to_e4m3(xa, x_scale).to(tl.float32)[None, :], axis=1)
        if KB > 0:
            acc += tl.sum(wb.to(tl.float32) * to_e4m3(xb, x_scale).to(tl.float32)[None, :], axis=1)
        y = acc * (x_scale * ws)
        if sw:
            gate, up = tl.split(tl.reshape(y, (ROWS // 2, 2)))
            jo = (t - first) * (ROWS // 2) + tl.arange(0, ROWS // 2)
            tl.store(act_ptr + out_off + jo, (gate / (1.0 + tl.exp(-gate)) * up).to(act_ptr.dtype.element_ty),
                     mask=jo < n)
        else:
            y = y.to(act_ptr.dtype.element_ty)
            if flags & RESIDUAL:  # the bf16 add of the reference: both operands rounded, then the sum
                res = tl.load(act_ptr + tl.load(d + 8) + j, mask=valid, other=0.0, cache_modifier=".cg")
                y = (res.to(tl.float32) + y.to(tl.float32)).to(act_ptr.dtype.element_ty)
            tl.store(act_ptr + out_off + j, y, mask=valid)
        tl.debug_barrier()  # every thread's store before the release
        tl.atomic_add(ctr_ptr + 2 + s, 1, sem="release", scope="gpu")
        t = tl.atomic_add(ctr_ptr, 1)
    if last_to_arrive(ctr_ptr + 1, NPROG):  # every tile is done: reset for the next call
        tl.atomic_xchg(ctr_ptr, 0)
        for i in range(0, S):
            tl.atomic_xchg(ctr_ptr + 2 + i, 0)
        tl.atomic_xchg(ctr_ptr + 1, 0)


class ChainStage(NamedTuple):
    """One GEMV of the chain. weight [N, K] e4m3 (with swiglu [2N, K]: gate rows, then up rows), row_scales
    [N] (or [2N]) fp32, input_scale: the static input scale (one element). norm_weight [K]: RMSNorm the input
    with it first. residual_from: add the input of that earlier stage to the output (not with swiglu)."""
    weight: torch.Tensor
    row_scales: torch.Tensor
    input_scale: torch.Tensor
    swiglu: bool = False
    norm_weight: torch.Tensor | None = None
    residual_from: int | None = None

    @property
    def n_out(self) -> int:
        return self.weight.shape[0] // (2 if self.swiglu else 1)


def _checked(stages) -> list[ChainStage]:
    if not stages:
        raise ValueError("a chain needs at least one stage")
    out = []
    for i, st in enumerate(stages):
        st = ChainStage(*st)
        w, ws, xs = st.weight, st.row_scales, st.input_scale
        if w.dtype != torch.float8_e4m3fn or w.dim() != 2 or ws.numel() != w.shape[0] or xs.numel() != 1:
            raise ValueError(f"stage {i}: expected e4m3 weight [N, K], [N] row scales and one input scale, got "
                             f"{w.dtype} {list(w.shape)}, {ws.numel()} scales, {xs.numel()} input scales")
        if st.swiglu and w.shape[0] % 2:
            raise ValueError(f"stage {i}: a SwiGLU weight stacks gate and up rows, got an odd {w.shape[0]} rows")
        if i and w.shape[1] != out[-1].n_out:
            raise ValueError(f"stage {i}: K={w.shape[1]} but stage {i - 1} gives N={out[-1].n_out}")
        if st.norm_weight is not None and st.norm_weight.numel() != w.shape[1]:
            raise ValueError(f"stage {i}: norm weight of {st.norm_weight.numel()} elements for K={w.shape[1]}")
        if st.residual_from is not None:
            rf = st.residual_from
            if st.swiglu or not 0 <= rf < i:
                raise ValueError(f"stage {i}: residual_from={rf}: expected an earlier stage (0..{i - 1}), "
                                 f"and no SwiGLU in the same stage")
            if stages[rf][0].shape[1] != st.n_out:
                raise ValueError(f"stage {i}: residual from stage {rf} has {stages[rf][0].shape[1]} elements, "
                                 f"the output {st.n_out}")
        out.append(st)
    return out


class GemvChain:
    """x -> stage 1 -> ... -> stage S, one token, as one persistent launch (stages: ChainStage, or tuples of
    its fields). The weights are packed once, here, into one buffer (the engine would store them packed)."""

    def __init__(self, stages, rows: int = 4, programs: int | None = None, num_warps: int = 4,
                 eps: float = 1e-5):
        stages = _checked(stages)
        if rows < 2 or rows & (rows - 1):
            raise ValueError(f"rows={rows}: expected a power of two >= 2 (a SwiGLU tile holds gate and up rows)")
        dev = stages[0].weight.device
        self.k_in, self.n_out = stages[0].weight.shape[1], stages[-1].n_out
        self.rows, self.num_warps, self.eps = rows, num_warps, eps
        desc, inputs, w_off, x_off, sc_off, g_off, first = [], [], 0, 0, 0, 0, 0
        for st in stages:
            k = st.weight.shape[1]
            flags = (SWIGLU * st.swiglu) | (NORM * (st.norm_weight is not None)) | \
                (RESIDUAL * (st.residual_from is not None))
            res = inputs[st.residual_from] if st.residual_from is not None else 0
            desc.append([w_off, st.n_out, k, x_off, sc_off, first, flags, x_off + k, res, g_off])
            inputs.append(x_off)
            w_off, sc_off, x_off = w_off + st.weight.numel(), sc_off + st.weight.shape[0], x_off + k
            g_off += k if st.norm_weight is not None else 0
            first += triton.cdiv(st.n_out, rows >> st.swiglu)
        self.tiles = first
        self.weights = torch.cat([st.weight.reshape(-1) for st in stages])
        self.row_scales = torch.cat([st.row_scales.float().reshape(-1) for st in stages])
        self.input_scales = torch.cat([st.input_scale.float().reshape(1) for st in stages])
        norms = [st.norm_weight.reshape(-1).to(torch.bfloat16) for st in stages if st.norm_weight is not None]
        self.norm_weights = torch.cat(norms) if norms else torch.zeros(1, dtype=torch.bfloat16, device=dev)
        self.desc = torch.tensor(desc, dtype=torch.int64, device=dev)
        self.act = torch.zeros(x_off + self.n_out, dtype=torch.bfloat16, device=dev)  # every stage's input, then y
        self.counters = torch.zeros(2 + len(stages), dtype=torch.int32, device=dev)
        self.ka, self.kb = k_pieces(max(st.weight.shape[1] for st in stages))
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
        self.programs = programs or min(self.tiles, 2 * sms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [K] or [1, K] -> y [N] bf16 (a view of the chain's workspace: the next call overwrites it)."""
        if x.numel() != self.k_in:
            raise ValueError(f"the chain's input has {self.k_in} elements, got {list(x.shape)}")
        self.act[:self.k_in].copy_(x.reshape(-1))
        _chain_kernel[(self.programs,)](
            self.weights, self.row_scales, self.input_scales, self.norm_weights, self.act, self.desc, self.counters,
            self.desc.shape[0], self.tiles, self.programs, self.eps, ROWS=self.rows, KA=self.ka, KB=self.kb,
            **pdl_launch(x.device), num_warps=self.num_warps)
        return self.act[-self.n_out:]


def gemv_chain_ref(x: torch.Tensor, stages, eps: float = 1e-5) -> torch.Tensor:
    """Specification: the reference ops a decoder layer runs, one after the other, in bf16: rms_norm_ref,
    fp8_linear_ref (SwiGLU in fp32 on its output), the residual add."""
    import torch.nn.functional as F

    from ..fp8 import fp8_linear_ref
    from ..norm import rms_norm_ref

    y, inputs = x.reshape(1, -1).to(torch.bfloat16), []
    for st in _checked(stages):
        inputs.append(y)
        if st.norm_weight is not None:
            y = rms_norm_ref(y, st.norm_weight.to(torch.bfloat16), eps)
        if st.swiglu:
            g, u = fp8_linear_ref(y, st.weight, st.row_scales, st.input_scale, torch.float32).chunk(2, dim=-1)
            y = (F.silu(g) * u).to(torch.bfloat16)
        else:
            y = fp8_linear_ref(y, st.weight, st.row_scales, st.input_scale, torch.bfloat16)
        if st.residual_from is not None:
            y = inputs[st.residual_from] + y
    return y.reshape(-1)
