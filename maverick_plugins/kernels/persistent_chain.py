"""A chain of FP8 GEMVs as one persistent launch: each program runs its tiles in order, each tile waiting on a
counter for its input.

The first piece of a persistent decode kernel. A decode step at batch 1 is a chain of small weight
streams, and each launch pays a fixed ramp that PDL hides only in part: the 48-layer GEMV chain reached
44% of bandwidth at one H200 rank. Here the whole chain is one grid of one program an SM (about 240
registers a thread at 8 warps leave room for one). Program p runs tiles p, p + programs, ... (a tile: ROWS
weight rows of one stage), so it knows its next tile without a queue and asks L2 for that tile's weights
(one bulk prefetch a contiguous block) before it runs the current one. A tile loads its weights before it
waits until every tile of the stages it reads has signalled; the program waits once a stage and signals
once a stage, with the count of its tiles there. Stages with K at most a half (a quarter) of the widest
take tiles of twice (four times) the rows and fewer columns: the same registers, no multiplies of masked
columns (fc2 of the dense MLP, K=2048 at TP8; of the experts, K=1024).

Measured (H100, one TP8 rank's shapes, 50f1ecd; BENCHMARKS.md): the 48-layer GEMV chain in 1.07 ms against
0.46 ms as one launch a stage; 0.85 ms without the waits (the tiles alone: one program an SM issues 0.3
instructions a cycle a scheduler, L1 scoreboard stalls first); the waits cost about 2.2 us a stage. The
tiles' FP32 math after the wait, not the stream, sets the pace (benchmarks/HISTORY.md part 19: the
counters, and what comes next). Hence the dot option: each tile's products on tensor cores, one
instruction for thousands of products in place of a conversion and an FMA each (not yet measured).

A stage may also do what the launches around a GEMV do in a decoder layer, so a dense MLP block (RMSNorm,
fc13 + SwiGLU, fc2, residual add) is two stages and no other launch:
- norm: RMSNorm the input with a weight first. Every tile recomputes the norm of the whole input (10 KB at
  hidden 5120, from L2) instead of waiting on a norm stage: no stage of one tile in the chain.
- swiglu: the weight is [gate; up] (2N rows) and the stage gives silu(gate x) * (up x). A tile's rows
  interleave gate and up rows, so every stage's tiles load the same ROWS rows of weights.
- residual: the output is an earlier stage's output (or the chain's input) plus the product (the residual
  stream).
- router: bf16 weight [E, K], no quantization: the output is the E router logits (rounded to bf16, as the
  router kernel writes them).
- experts: the weight is [E, N, K] and each tile takes expert e's rows, e the top-1 of a router stage's
  logits (ties: the lowest id), picked in the tile itself; scored: the input times sigmoid(logit of e), the
  score Llama 4 puts on the expert's input. So the router's pick feeds the expert tiles with no host
  round trip and no pick step. Such a tile waits before it loads its weights (it needs e); the shared
  expert's tiles, numbered before, stream theirs meanwhile.
A stage reads its input from any earlier stage (by default the one before) or from one of the chain's
inputs (a layer's attention output and residual stream, say), and waits for exactly the
stages it reads: its input, its residual and its router.

Tiles are numbered in stage order and a tile waits only on lower-numbered ones. Every program is resident
(at most one an SM), so the lowest unfinished tile always runs: no deadlock. The Triton interpreter (CPU)
runs programs one after another, so there the chain is one program, which runs every tile in order. Every
stage writes its own part of the workspace, so no tile overwrites what a later one still reads.

The arithmetic is that of the launches it replaces: add_rms_norm's norm (fp32 sums, bf16 rounding, times
the weight), fp8_gemv's products (x quantized with the stage's static scale, exact e4m3 products, fp32 sums,
row scales, one token, SwiGLU in fp32), the router kernel's fp32 sums, moe_gemv's score rounding, and the
bf16 residual add. The MoE's two down projections are two residual stages here (h + shared, then + routed),
where moe_ffn adds shared and routed first: one bf16 rounding apart. Expert-parallel ranks (experts of
other ranks) are not covered: each expert stage holds every expert. The specification is gemv_chain_ref
(maverick_plugins/persistent.py).
"""
import torch
import triton
import triton.language as tl

from ..persistent import check_inputs, checked_stages
from .counters import last_to_arrive
from .e4m3 import to_e4m3
from .fp8_gemv import k_pieces
from .pdl import pdl_enter, pdl_launch
from .router_pick import argmax_lowest, sigmoid_score

# stage flags, and the desc columns of a stage (constexpr: the kernel reads them; the host takes .value)
SWIGLU, RESIDUAL, NORM, ROUTER, EXPERTS, SCORED = (tl.constexpr(1 << i) for i in range(6))
W_OFF, N, K, X_OFF, SC_OFF, FIRST, FLAGS, OUT_OFF, RES_OFF, G_OFF, DEP0, DEP1, DEP2, LOGITS_OFF, E_WSTRIDE, \
    E_SSTRIDE, TILES, WIDE, COLS = (tl.constexpr(i) for i in range(19))
ALIGN = tl.constexpr(16)  # elements: every weight row, workspace part and norm weight starts on a multiple
_COLUMNS = (W_OFF, N, K, X_OFF, SC_OFF, FIRST, FLAGS, OUT_OFF, RES_OFF, G_OFF, DEP0, DEP1, DEP2, LOGITS_OFF,
            E_WSTRIDE, E_SSTRIDE, TILES, WIDE)


@triton.jit
def _times_weight(y, w):
    """bf16 y * bf16 w rounded to bf16, as the reference: the product is exact in fp32, so one rounding."""
    return (y.to(tl.float32) * w.to(tl.float32)).to(y.dtype)


@triton.jit
def _row_stride(k):
    """Elements from one packed weight row to the next: K rounded up to ALIGN (the host's _aligned)."""
    return tl.multiple_of((k + ALIGN - 1) // ALIGN * ALIGN, ALIGN)


@triton.jit
def _wait(desc_ptr, ctr_ptr, d):
    """Until every tile of stage d (if d >= 0, an earlier stage) has signalled."""
    if d >= 0:
        need = tl.load(desc_ptr + d * COLS + TILES)
        while tl.atomic_add(ctr_ptr + 1 + d, 0, sem="acquire", scope="gpu") < need:
            pass


@triton.jit
def _wait_inputs(desc_ptr, ctr_ptr, st):
    _wait(desc_ptr, ctr_ptr, tl.load(st + DEP0))
    _wait(desc_ptr, ctr_ptr, tl.load(st + DEP1))
    _wait(desc_ptr, ctr_ptr, tl.load(st + DEP2))


@triton.jit
def _input(act_ptr, g_ptr, st, x_off, k, flags, eps, ka, kb, KB: tl.constexpr):
    """The stage's input in two pieces (KA, KB; the second = the first when KB is 0), RMSNormed with the
    stage's norm weight if it has one (add_rms_norm_row's arithmetic over both pieces). .cg: other programs
    wrote it, past this SM's L1."""
    dt = act_ptr.dtype.element_ty
    xa = tl.load(act_ptr + x_off + ka, mask=ka < k, other=0.0, cache_modifier=".cg")
    xb = xa
    if KB > 0:
        xb = tl.load(act_ptr + x_off + kb, mask=kb < k, other=0.0, cache_modifier=".cg")
    if flags & NORM:
        fa = xa.to(tl.float32)
        ss = tl.sum(fa * fa, axis=0)
        fb = fa
        if KB > 0:
            fb = xb.to(tl.float32)
            ss += tl.sum(fb * fb, axis=0)
        inv = tl.rsqrt(ss / k.to(tl.float32) + eps)
        g_off = tl.multiple_of(tl.load(st + G_OFF), ALIGN)
        xa = _times_weight((fa * inv).to(dt), tl.load(g_ptr + g_off + ka, mask=ka < k, other=0.0))
        if KB > 0:
            xb = _times_weight((fb * inv).to(dt), tl.load(g_ptr + g_off + kb, mask=kb < k, other=0.0))
    return xa, xb


@triton.jit
def _prefetch_l2(ptr, nbytes, lane):
    """Hopper bulk prefetch of nbytes (a multiple of 16, 16-byte aligned) at ptr into L2, by the thread whose
    lane is 0 (one request, not one a thread). GPU only: the interpreter has no inline PTX."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.eq.s32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r,r", [ptr, nbytes, lane], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_tile(w_ptr, desc_ptr, stage_ptr, t, TOTAL, ROWS: tl.constexpr, THREADS: tl.constexpr):
    """Ask L2 for tile t's FP8 weight rows (the gate and the up block of a SwiGLU tile): they are contiguous,
    so one request a block. Not for router tiles (bf16, few), nor expert tiles (the expert is not known yet)."""
    s = tl.load(stage_ptr + tl.minimum(t, TOTAL - 1))
    st = desc_ptr + s * COLS
    flags = tl.load(st + FLAGS)
    if (t < TOTAL) & ((flags & (ROUTER | EXPERTS)) == 0):
        n, first, k = tl.load(st + N), tl.load(st + FIRST), tl.load(st + K)
        sw = flags & SWIGLU
        per = (ROWS << tl.load(st + WIDE)) >> sw  # outputs a tile
        row0 = (t - first) * per
        stride = _row_stride(k)
        nbytes = (tl.minimum(per, n - row0) * stride).to(tl.int32)
        base = w_ptr + tl.load(st + W_OFF) + row0 * stride
        lane = tl.arange(0, THREADS)
        _prefetch_l2(base + lane * 0, nbytes + lane * 0, lane)
        if sw:
            _prefetch_l2(base + n * stride + lane * 0, nbytes + lane * 0, lane)


@triton.jit
def _products(w, q, RT: tl.constexpr, W: tl.constexpr, DOT: tl.constexpr):
    """sum over k of w[r, k] * q[k] for each of the RT rows (e4m3 weights and input, fp32 sums). DOT: on tensor
    cores, the W columns cut into 16 slices: rows (r, slice p) of a [RT x 16, W / 16] matrix times the slices
    of q as 16 columns, of which block p of row (r, p) is wanted (the diagonal); 16 times the products, but
    an instruction per 16 x 8 x 32 of them instead of a conversion and an FMA per product."""
    if DOT:
        P: tl.constexpr = 16
        a = tl.reshape(w, (RT * P, W // P))
        b = tl.trans(tl.reshape(q, (P, W // P)))
        c = tl.reshape(tl.dot(a, b, out_dtype=tl.float32), (RT, P, P))
        i = tl.arange(0, P)
        diag = (i[:, None] == i[None, :])[None, :, :]
        return tl.sum(tl.sum(tl.where(diag, c, 0.0), axis=2), axis=1)
    else:
        return tl.sum(w.to(tl.float32) * q.to(tl.float32)[None, :], axis=1)


@triton.jit
def _run_tile(w_ptr, rw_ptr, ws_ptr, xs_ptr, g_ptr, act_ptr, desc_ptr, ctr_ptr, s, st, t, fresh, E, eps,
              RT: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, E_POW2: tl.constexpr, DOT: tl.constexpr):
    """Tile t of stage s (row st of desc) as RT weight rows of WA (+ WB) columns: waits for the stage's
    inputs first if `fresh` (this program's first tile of the stage), loads, multiplies, stores."""
    dt = act_ptr.dtype.element_ty
    ka = tl.arange(0, WA)
    kb = ka  # unused without a second piece
    if WB > 0:
        kb = WA + tl.arange(0, WB)
    r = tl.arange(0, RT)
    n, k, first, flags = tl.load(st + N), tl.load(st + K), tl.load(st + FIRST), tl.load(st + FLAGS)
    sw = flags & SWIGLU  # 1: tile row r is gate (even r) or up (odd r) of output (r >> 1)
    j = (t - first) * (RT >> sw) + (r >> sw)  # the output each weight row feeds
    valid = j < n
    wrow = (r & sw) * n + j
    stride = _row_stride(k)
    a_mask = valid[:, None] & (ka < stride)[None, :]  # padding columns hold zeros: whole 16-byte loads
    b_mask = valid[:, None] & (kb < stride)[None, :]
    pick = t * 0  # tensors: an expert stage's pick sets them
    score = (t * 0 + 1).to(tl.float32)
    if flags & EXPERTS:  # the pick first: it chooses the weights
        if fresh:
            _wait_inputs(desc_ptr, ctr_ptr, st)
        offs_e = tl.arange(0, E_POW2)  # .cg: the router's tiles wrote the logits, past this SM's L1
        lg = tl.load(act_ptr + tl.load(st + LOGITS_OFF) + offs_e, mask=offs_e < E, other=float("-inf"),
                     cache_modifier=".cg").to(tl.float32)
        pick, best = argmax_lowest(lg, offs_e, E_POW2)
        if flags & SCORED:
            score = sigmoid_score(best, dt).to(tl.float32)
    # hints on each term: one on an if's result is lost, and so is one on a sum that folds away (pick 0), and
    # the loads then go byte by byte
    w_base = tl.multiple_of(tl.load(st + W_OFF), ALIGN) + tl.multiple_of(
        pick.to(tl.int64) * tl.load(st + E_WSTRIDE), ALIGN)
    rows = w_base + wrow.to(tl.int64) * stride
    if flags & ROUTER:  # bf16 weights, the router kernel's fp32 sums of unquantized products
        ra = tl.load(rw_ptr + rows[:, None] + ka[None, :], mask=a_mask, other=0.0)
        if WB > 0:
            rb = tl.load(rw_ptr + rows[:, None] + kb[None, :], mask=b_mask, other=0.0)
        if fresh:
            _wait_inputs(desc_ptr, ctr_ptr, st)
        xa, xb = _input(act_ptr, g_ptr, st, tl.multiple_of(tl.load(st + X_OFF), ALIGN), k, flags, eps, ka, kb, WB)
        y = tl.sum(ra.to(tl.float32) * xa.to(tl.float32)[None, :], axis=1)
        if WB > 0:
            y += tl.sum(rb.to(tl.float32) * xb.to(tl.float32)[None, :], axis=1)
    else:  # the weights before the wait (but after an expert tile's pick): nothing writes them
        wa = tl.load(w_ptr + rows[:, None] + ka[None, :], mask=a_mask, other=0.0)
        if WB > 0:
            wb = tl.load(w_ptr + rows[:, None] + kb[None, :], mask=b_mask, other=0.0)
        s_base = tl.load(st + SC_OFF) + pick.to(tl.int64) * tl.load(st + E_SSTRIDE)
        ws = tl.load(ws_ptr + s_base + wrow, mask=valid, other=0.0)
        if fresh and (flags & EXPERTS) == 0:
            _wait_inputs(desc_ptr, ctr_ptr, st)
        xa, xb = _input(act_ptr, g_ptr, st, tl.multiple_of(tl.load(st + X_OFF), ALIGN), k, flags, eps, ka, kb, WB)
        x_scale = tl.load(xs_ptr + s)
        xa = (xa.to(tl.float32) * score).to(dt)  # moe_gemv rounds score * x to bf16 (exact at score 1)
        acc = _products(wa, to_e4m3(xa, x_scale), RT, WA, DOT)
        if WB > 0:
            xb = (xb.to(tl.float32) * score).to(dt)
            acc += _products(wb, to_e4m3(xb, x_scale), RT, WB, DOT)
        y = acc * (x_scale * ws)
    out_off = tl.multiple_of(tl.load(st + OUT_OFF), ALIGN)
    if sw:
        gate, up = tl.split(tl.reshape(y, (RT // 2, 2)))
        jo = (t - first) * (RT // 2) + tl.arange(0, RT // 2)
        tl.store(act_ptr + out_off + jo, (gate / (1.0 + tl.exp(-gate)) * up).to(dt), mask=jo < n)
    else:
        yo = y.to(dt)
        if flags & RESIDUAL:  # the bf16 add of the reference: both operands rounded, then the sum
            res = tl.load(act_ptr + tl.load(st + RES_OFF) + j, mask=valid, other=0.0, cache_modifier=".cg")
            yo = (res.to(tl.float32) + yo.to(tl.float32)).to(dt)
        tl.store(act_ptr + out_off + j, yo, mask=valid)


@triton.jit
def _chain_kernel(w_ptr, rw_ptr, ws_ptr, xs_ptr, g_ptr, act_ptr, desc_ptr, stage_ptr, ctr_ptr, S, TOTAL, NPROG, E,
                  eps, ROWS: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, E_POW2: tl.constexpr,
                  PREFETCH: tl.constexpr, THREADS: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
    """desc: a row of COLS int64 a stage (the column names above; DEPn: stages to wait for, -1 none).
    stage: each tile's stage (int32). ctr: [0] programs done, [1 + s] tiles of stage s done; the last
    program out sets them back to 0 (the next call and graph replay start from zero). rw: the router
    stages' bf16 weights.

    Program p runs tiles p, p + NPROG, ... in order, so it knows its next tile without a queue: with
    PREFETCH it asks L2 for that tile's weights before it runs the current one. Consecutive tiles of one
    stage wait once, and the program signals the stage once, with the count of its tiles there. Every
    program must be resident (NPROG <= SMs) since a tile waits on tiles other programs hold; the smallest
    unfinished tile then always runs. A stage's tiles are ROWS << WIDE rows of KA + KB >> WIDE columns:
    the same registers for any K, and no multiplies of masked columns for narrow ones."""
    t = tl.program_id(0)
    if PREFETCH:  # weights depend on nothing: the first tile's stream before the predecessor's wait
        _prefetch_tile(w_ptr, desc_ptr, stage_ptr, t, TOTAL, ROWS, THREADS)
    pdl_enter(PDL)  # the first stage's input may be the previous kernel's output
    x_stage = t * 0 - 1  # the stage this program last waited for
    done = t * 0  # this program's tiles of that stage not yet signalled
    while t < TOTAL:
        s = tl.load(stage_ptr + t)
        st = desc_ptr + s * COLS
        tn = t + NPROG
        sn = tl.load(stage_ptr + tl.minimum(tn, TOTAL - 1))
        if PREFETCH:
            _prefetch_tile(w_ptr, desc_ptr, stage_ptr, tn, TOTAL, ROWS, THREADS)
        fresh = s != x_stage
        wide = tl.load(st + WIDE)
        if wide == 0:
            _run_tile(w_ptr, rw_ptr, ws_ptr, xs_ptr, g_ptr, act_ptr, desc_ptr, ctr_ptr, s, st, t, fresh, E, eps,
                      ROWS, KA, KB, E_POW2, DOT)
        elif wide == 1:
            _run_tile(w_ptr, rw_ptr, ws_ptr, xs_ptr, g_ptr, act_ptr, desc_ptr, ctr_ptr, s, st, t, fresh, E, eps,
                      2 * ROWS, KA // 2, 0, E_POW2, DOT)
        else:
            _run_tile(w_ptr, rw_ptr, ws_ptr, xs_ptr, g_ptr, act_ptr, desc_ptr, ctr_ptr, s, st, t, fresh, E, eps,
                      4 * ROWS, KA // 4, 0, E_POW2, DOT)
        x_stage = s
        done += 1
        if (sn != s) | (tn >= TOTAL):  # this program's last tile of stage s: signal them all at once
            tl.debug_barrier()  # every thread's store before the release
            tl.atomic_add(ctr_ptr + 1 + s, done, sem="release", scope="gpu")
            done = t * 0
        t = tn
    if last_to_arrive(ctr_ptr, NPROG):  # every tile is done: reset for the next call
        for i in range(0, S):
            tl.atomic_xchg(ctr_ptr + 1 + i, 0)
        tl.atomic_xchg(ctr_ptr, 0)


def _aligned(v: int) -> int:
    """v rounded up to a multiple of ALIGN (weight rows and workspace parts start on one)."""
    return -(-v // ALIGN.value) * ALIGN.value


def _wide(k: int, ka: int) -> int:
    """A stage's tile shape: rows << w rows of ka >> w columns (w = 0: ka + kb columns), the narrowest that
    holds K. K=2048 and 1024 at one TP8 rank (fc2 of the dense MLP, of the experts): 2 and 4 times the rows."""
    for w in (2, 1):
        if _aligned(k) <= ka >> w and ka >> w >= ALIGN.value:
            return w
    return 0


def _packed(weights: list[torch.Tensor], dtype: torch.dtype, dev) -> torch.Tensor:
    """The weights' rows one after the other, each padded with zeros to a multiple of ALIGN elements."""
    parts = []
    for w in weights:
        rows = w.to(dtype).reshape(-1, w.shape[-1])
        k = rows.shape[1]
        pad = torch.zeros(rows.shape[0], _aligned(k), dtype=dtype, device=dev)
        pad.view(torch.uint8 if dtype.itemsize == 1 else torch.int16)[:, :k].copy_(
            rows.view(torch.uint8 if dtype.itemsize == 1 else torch.int16))
        parts.append(pad.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(ALIGN.value, dtype=dtype, device=dev)


def _share(weights: list[torch.Tensor], packed: torch.Tensor) -> None:
    """Point each weight at its rows in the packed buffer (`.data`, so a module's Parameter follows), so
    the chain and the launches read one copy. Rows without padding only (K a multiple of ALIGN), where
    the packed rows are the weight's own layout."""
    off = 0
    for w in weights:
        if w.shape[-1] % ALIGN.value:
            raise ValueError(f"share_weights needs K a multiple of {ALIGN.value}, got a weight {list(w.shape)}")
        w.data = packed[off:off + w.numel()].view(w.shape)
        off += w.numel()


class GemvChain:
    """x -> stage 1 -> ... -> stage S, one token, as one persistent launch (stages: ChainStage, or tuples of
    its fields); the output is the last stage's. inputs: the sizes of the chain's inputs, when there are
    several (a decoder layer's attention output and residual stream, say); by default one, the first
    stage's K. The weights are packed once, here, into one buffer; share_weights: the stages' weight
    tensors then become views of it (the model's modules keep working, on one copy). workspace / start /
    input_at: the chain's parts from element `start` of a shared bf16 workspace, and inputs that already sit
    in it (another chain's output) read there without a copy; `end` is where the next chain may start.
    programs: at most one an SM (every program must run at once), by default one an SM (one on CPU).
    prefetch: ask L2 for each program's next tile (on CUDA; 2% faster on the GEMV chain, H100). dot: the tiles'
    products on tensor cores (_products); not yet measured, so off by default."""

    def __init__(self, stages, rows: int = 8, programs: int | None = None, num_warps: int = 8,
                 eps: float = 1e-5, inputs: tuple[int, ...] | None = None, share_weights: bool = False,
                 workspace: torch.Tensor | None = None, start: int = 0, input_at: tuple[int | None, ...] = (),
                 prefetch: bool = True, dot: bool = False):
        stages = checked_stages(stages, inputs)
        if rows < 2 or rows & (rows - 1):
            raise ValueError(f"rows={rows}: expected a power of two >= 2 (a SwiGLU tile holds gate and up rows)")
        dev = stages[0].weight.device
        self.ka, self.kb = k_pieces(max(st.k for st in stages))
        self.prefetch = prefetch and dev.type == "cuda"  # inline PTX: not in the interpreter
        if dot and not (self.ka >= 2048 and (self.kb == 0 or self.kb >= 512)):
            raise ValueError(f"dot=True: the tile widths (K pieces {self.ka} + {self.kb}) must be at least 512 "
                             f"columns at every tile shape (the widest K at least 2048; a second piece 0 or >= 512)")
        self.dot = dot
        self.inputs = tuple(inputs or (stages[0].k,))
        self.rows, self.num_warps, self.eps = rows, num_warps, eps
        a = ALIGN.value
        self.input_offs, end = [], start  # the inputs, then each stage's output, from `start` in act
        for i, k in enumerate(self.inputs):
            placed = input_at[i] if i < len(input_at) else None
            if placed is not None:  # already in the workspace (another chain's output): read in place
                if placed % a:
                    raise ValueError(f"input {i} at element {placed}: expected a multiple of {a}")
                self.input_offs.append(placed)
            else:
                self.input_offs.append(end)
                end += _aligned(k)
        offs = []
        for st in stages:
            offs.append(end)
            end += _aligned(st.n_out)
        at = lambda src: self.input_offs[-1 - src] if src < 0 else offs[src]  # noqa: E731
        desc, first, w_off, rw_off, sc_off, g_off = [], 0, 0, 0, 0, 0
        e_max = 2
        for i, st in enumerate(stages):
            flags = sum(f.value for f, on in ((SWIGLU, st.swiglu), (NORM, st.norm_weight is not None),
                                              (RESIDUAL, st.residual_from is not None), (ROUTER, st.router),
                                              (EXPERTS, st.experts_from is not None), (SCORED, st.scored)) if on)
            deps = sorted({d for d in (st.input_from, st.residual_from, st.experts_from) if d is not None and d >= 0})
            deps += [-1] * (3 - len(deps))
            row = {W_OFF: rw_off if st.router else w_off, N: st.n_out, K: st.k, X_OFF: at(st.input_from),
                   SC_OFF: sc_off, FIRST: first, FLAGS: flags, OUT_OFF: offs[i], G_OFF: g_off,
                   RES_OFF: at(-1 if st.residual_from is None else st.residual_from),
                   DEP0: deps[0], DEP1: deps[1], DEP2: deps[2]}
            if st.experts_from is not None:
                row.update({LOGITS_OFF: offs[st.experts_from], E_WSTRIDE: st.rows * _aligned(st.k),
                            E_SSTRIDE: st.rows})
            row[WIDE] = _wide(st.k, self.ka)
            row[TILES] = triton.cdiv(st.n_out, (rows << row[WIDE]) >> st.swiglu)
            size = st.weight[..., :1].numel() * _aligned(st.k)  # rows padded to a multiple of ALIGN
            if st.router:
                rw_off += size
                e_max = max(e_max, st.rows)
            else:
                w_off += size
                sc_off += st.row_scales.numel()
            g_off += _aligned(st.k) if st.norm_weight is not None else 0
            first += row[TILES]
            desc.append([row.get(c, 0) for c in _COLUMNS])
        self.tiles, self.e = first, e_max
        self.spans = [(offs[i], st.n_out) for i, st in enumerate(stages)]  # each stage's output in act
        self.weights = _packed([st.weight for st in stages if not st.router], torch.float8_e4m3fn, dev)
        self.router_weights = _packed([st.weight for st in stages if st.router], torch.bfloat16, dev)
        if share_weights:
            _share([st.weight for st in stages if not st.router], self.weights)
            _share([st.weight for st in stages if st.router], self.router_weights)
        sc = [st.row_scales.float().reshape(-1) for st in stages if not st.router]
        self.row_scales = torch.cat(sc) if sc else torch.zeros(1, device=dev)
        self.input_scales = torch.stack([torch.ones((), device=dev) if st.router else st.input_scale.float().reshape(())
                                         for st in stages])
        self.norm_weights = _packed([st.norm_weight.reshape(1, -1) for st in stages if st.norm_weight is not None],
                                    torch.bfloat16, dev)
        self.desc = torch.tensor(desc, dtype=torch.int64, device=dev)
        self.tile_stage = torch.repeat_interleave(torch.arange(len(desc), dtype=torch.int32),
                                                  torch.tensor([d[TILES.value] for d in desc])).to(dev)
        self.end = end  # the first element of the workspace after this chain's parts
        if workspace is None:
            workspace = torch.zeros(end, dtype=torch.bfloat16, device=dev)
        elif workspace.dtype != torch.bfloat16 or workspace.numel() < end or start % a:
            raise ValueError(f"workspace: expected bf16 with at least {end} elements and start a multiple of {a}, "
                             f"got {workspace.dtype} of {workspace.numel()}, start {start}")
        self.act = workspace  # the chain's inputs and every stage's output (several chains may share one)
        self.counters = torch.zeros(1 + len(stages), dtype=torch.int32, device=dev)
        # every program resident at once (tiles wait on other programs' tiles): about 240 registers a thread
        # at 8 warps leave room for one an SM. The interpreter runs programs one after another: one program
        # there, which takes the tiles in order.
        most = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
        if programs is not None and not 1 <= programs <= most:
            raise ValueError(f"programs={programs}: expected 1..{most} (one an SM on {dev}: tiles wait on other "
                             f"programs' tiles, so every program must run at once)")
        self.programs = min(programs or most, self.tiles)

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        """The inputs ([K] or [1, K] each) -> the last stage's output [N] bf16 (a view of the chain's
        workspace: the next call overwrites it)."""
        check_inputs(xs, self.inputs)
        for x, start in zip(xs, self.input_offs):
            slot = self.act[start:start + x.numel()]
            if x.data_ptr() != slot.data_ptr():  # an input placed in the workspace needs no copy
                slot.copy_(x.reshape(-1))
        _chain_kernel[(self.programs,)](
            self.weights, self.router_weights, self.row_scales, self.input_scales, self.norm_weights, self.act,
            self.desc, self.tile_stage, self.counters, len(self.desc), self.tiles, self.programs, self.e, self.eps,
            ROWS=self.rows, KA=self.ka, KB=self.kb, E_POW2=triton.next_power_of_2(self.e), PREFETCH=self.prefetch,
            THREADS=32 * self.num_warps, DOT=self.dot, **pdl_launch(xs[0].device), num_warps=self.num_warps)
        return self.output(-1)

    def output(self, stage: int) -> torch.Tensor:
        """Stage `stage`'s output in the workspace (after a call; -1 the last stage's): a view, no copy and no
        device read (so in a CUDA graph too)."""
        start, n = self.spans[stage]
        return self.act[start:start + n]


def footprint(stages, inputs: tuple[int, ...] | None = None) -> int:
    """Workspace elements a chain needs at most (every input copied in)."""
    stages = checked_stages(stages, inputs)
    return sum(map(_aligned, inputs or (stages[0].k,))) + sum(_aligned(st.n_out) for st in stages)
