"""A chain of FP8 GEMVs as one persistent launch: tiles from a queue, each waiting on a counter for its input.

The first piece of a persistent decode kernel. A decode step at batch 1 is a chain of small weight
streams, and each launch pays a fixed ramp that PDL hides only in part: the 48-layer GEMV chain reached
44% of bandwidth at one H200 rank. Here the whole chain is one grid of about two programs an SM. A program
takes the next tile (BLOCK_N output rows of one stage) from a queue counter. It loads that tile's weights
first, since weights depend on nothing. Then it waits until every tile of the stage before has signalled,
reads that stage's output, and signals its own stage. So the next stage's weights stream in while the
current stage finishes, with no launch between them.

Tiles are queued in stage order. A tile waits only on tiles that were taken before it, by programs that
are already running and never wait on later tiles, so the chain cannot deadlock whatever the grid size or
residency. The Triton interpreter (CPU) runs programs one after another and still completes: the first
program takes every tile in order.

The arithmetic is fp8_gemv's: x quantized with the stage's static scale, exact e4m3 products, fp32 sums,
row scales, one token. The specification is gemv_chain_ref, the chain of fp8_linear_ref calls.
"""
import torch
import triton
import triton.language as tl

from .counters import last_to_arrive
from .e4m3 import to_e4m3
from .fp8_gemv import k_pieces
from .pdl import pdl_enter, pdl_launch


@triton.jit
def _chain_kernel(w_ptr, ws_ptr, xs_ptr, act_ptr, desc_ptr, ctr_ptr, S, TOTAL, NPROG,
                  BLOCK_N: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, PDL: tl.constexpr):
    """desc: a row of 6 int64 a stage (weight offset, N, K, input offset in act, row-scale offset, first
    tile). ctr: [0] the tile queue, [1] programs done, [2 + s] tiles of stage s done; the last program out
    sets them back to 0 (the next call and graph replay start from zero)."""
    pdl_enter(PDL)  # the first stage's input may be the previous kernel's output
    ka = tl.arange(0, KA)
    t = tl.atomic_add(ctr_ptr, 1)
    while t < TOTAL:
        s = 0
        for i in range(1, S):  # this tile's stage: how many stages start at or before it
            s += (tl.load(desc_ptr + i * 6 + 5) <= t).to(tl.int32)
        d = desc_ptr + s * 6
        w_off, n, k = tl.load(d + 0), tl.load(d + 1), tl.load(d + 2)
        x_off, sc_off, first = tl.load(d + 3), tl.load(d + 4), tl.load(d + 5)
        offs_n = (t - first) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n
        rows = w_off + offs_n.to(tl.int64) * k
        # the tile's weights before the wait: nothing writes them
        wa = tl.load(w_ptr + rows[:, None] + ka[None, :], mask=n_mask[:, None] & (ka < k)[None, :], other=0.0)
        if KB > 0:
            kb = KA + tl.arange(0, KB)
            wb = tl.load(w_ptr + rows[:, None] + kb[None, :], mask=n_mask[:, None] & (kb < k)[None, :], other=0.0)
        ws = tl.load(ws_ptr + sc_off + offs_n, mask=n_mask, other=0.0)
        x_scale = tl.load(xs_ptr + s)
        if s > 0:  # every tile of the stage before: its output is this stage's input
            need = first - tl.load(desc_ptr + (s - 1) * 6 + 5)
            while tl.atomic_add(ctr_ptr + 2 + s - 1, 0, sem="acquire", scope="gpu") < need:
                pass
        # .cg: other programs wrote the input, past this SM's L1
        xa = to_e4m3(tl.load(act_ptr + x_off + ka, mask=ka < k, other=0.0, cache_modifier=".cg"),
                     x_scale).to(tl.float32)
        acc = tl.sum(wa.to(tl.float32) * xa[None, :], axis=1)
        if KB > 0:
            xb = to_e4m3(tl.load(act_ptr + x_off + kb, mask=kb < k, other=0.0, cache_modifier=".cg"),
                         x_scale).to(tl.float32)
            acc += tl.sum(wb.to(tl.float32) * xb[None, :], axis=1)
        y = acc * (x_scale * ws)
        out_off = x_off + k  # stage s + 1's input follows this stage's in the workspace
        tl.store(act_ptr + out_off + offs_n, y.to(act_ptr.dtype.element_ty), mask=n_mask)
        tl.debug_barrier()  # every thread's store before the release
        tl.atomic_add(ctr_ptr + 2 + s, 1, sem="release", scope="gpu")
        t = tl.atomic_add(ctr_ptr, 1)
    if last_to_arrive(ctr_ptr + 1, NPROG):  # every tile is done: reset for the next call
        tl.atomic_xchg(ctr_ptr, 0)
        for i in range(0, S):
            tl.atomic_xchg(ctr_ptr + 2 + i, 0)
        tl.atomic_xchg(ctr_ptr + 1, 0)


class GemvChain:
    """x -> stage 1 -> ... -> stage S, one token, as one persistent launch. Stages: (weight [N, K] e4m3,
    row scales [N] fp32, static input scale (scalar) fp32); each stage's K is the previous one's N. The
    weights are packed once, here, into one buffer (the engine would store them packed)."""

    def __init__(self, stages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], block_n: int = 4,
                 programs: int | None = None, num_warps: int = 4):
        if not stages:
            raise ValueError("a chain needs at least one stage")
        for i, (w, ws, xs) in enumerate(stages):
            if w.dtype != torch.float8_e4m3fn or w.dim() != 2 or ws.numel() != w.shape[0] or xs.numel() != 1:
                raise ValueError(f"stage {i}: expected e4m3 weight [N, K], [N] row scales and one input scale, got "
                                 f"{w.dtype} {list(w.shape)}, {ws.numel()} scales, {xs.numel()} input scales")
            if i and w.shape[1] != stages[i - 1][0].shape[0]:
                raise ValueError(f"stage {i}: K={w.shape[1]} but stage {i - 1} gives N={stages[i - 1][0].shape[0]}")
        dev = stages[0][0].device
        self.k_in, self.n_out = stages[0][0].shape[1], stages[-1][0].shape[0]
        self.block_n, self.num_warps = block_n, num_warps
        desc, w_off, x_off, sc_off, first = [], 0, 0, 0, 0
        for w, _, _ in stages:
            n, k = w.shape
            desc.append([w_off, n, k, x_off, sc_off, first])
            w_off, x_off, sc_off, first = w_off + n * k, x_off + k, sc_off + n, first + triton.cdiv(n, block_n)
        self.tiles = first
        self.weights = torch.cat([w.reshape(-1) for w, _, _ in stages])
        self.row_scales = torch.cat([ws.float().reshape(-1) for _, ws, _ in stages])
        self.input_scales = torch.cat([xs.float().reshape(1) for _, _, xs in stages])
        self.desc = torch.tensor(desc, dtype=torch.int64, device=dev)
        self.act = torch.zeros(x_off + self.n_out, dtype=torch.bfloat16, device=dev)  # every stage's input, then y
        self.counters = torch.zeros(2 + len(stages), dtype=torch.int32, device=dev)
        self.ka, self.kb = k_pieces(max(w.shape[1] for w, _, _ in stages))
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 2
        self.programs = programs or min(self.tiles, 2 * sms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [K] or [1, K] -> y [N] bf16 (a view of the chain's workspace: the next call overwrites it)."""
        if x.numel() != self.k_in:
            raise ValueError(f"the chain's input has {self.k_in} elements, got {list(x.shape)}")
        self.act[:self.k_in].copy_(x.reshape(-1))
        _chain_kernel[(self.programs,)](
            self.weights, self.row_scales, self.input_scales, self.act, self.desc, self.counters,
            self.desc.shape[0], self.tiles, self.programs, BLOCK_N=self.block_n, KA=self.ka, KB=self.kb,
            **pdl_launch(x.device), num_warps=self.num_warps)
        return self.act[-self.n_out:]


def gemv_chain_ref(x: torch.Tensor, stages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Specification: each stage's fp8_linear_ref in bf16, one after the other."""
    from ..fp8 import fp8_linear_ref

    y = x.reshape(1, -1).to(torch.bfloat16)
    for w, ws, xs in stages:
        y = fp8_linear_ref(y, w, ws, xs, torch.bfloat16)
    return y.reshape(-1)
