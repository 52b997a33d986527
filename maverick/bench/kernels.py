#!/usr/bin/env python3
"""Microbenchmarks of the min-latency kernels against cuBLAS (torch._scaled_mm), torch and a plain
read of the same bytes, all in CUDA graphs on this card, weights rotated out of L2. Prints a table."""
import argparse
import sys

import torch
import triton
import triton.language as tl


import maverick_plugins as ops
from maverick.bench.timing import graph_us
from maverick_plugins.kernels.decode_attention import decode_attention
from maverick_plugins.kernels.fp8_gemm import fp8_gemm_small_m
from maverick_plugins.kernels.moe_gemv import moe_experts_gemv

L2_BYTES = 60 << 20


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + pid, tl.sum(x.to(tl.int32), axis=0))


def plain_read(nbytes):
    """Reads of `nbytes` rotating over enough buffers that each read comes from HBM, not L2."""
    xs = [torch.randint(0, 100, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(copies(nbytes))]
    out = torch.empty(triton.cdiv(xs[0].numel(), 4096), dtype=torch.int32, device="cuda")
    return [lambda x=x: _read_kernel[(out.numel(),)](x, out, x.numel(), BLOCK=4096) for x in xs]


def copies(nbytes):
    return max(2, -(-2 * L2_BYTES // max(nbytes, 1)))


def fp8_weight(n, k):
    return (torch.randn(n, k, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)


def gemv_chain_stages(h, i, layers, row_scales=None):
    """2 x `layers` FP8 GEMV stages h -> i -> h, one TP8 rank's dense-MLP-like shapes: (weight, row scales,
    the static input scale 8/448) each; row_scales(n, k): a stage's [n] scales (by default 1e-3 each)."""
    stages = []
    for j in range(2 * layers):
        n, k = (i, h) if j % 2 == 0 else (h, i)
        w = fp8_weight(n, k)
        ws = row_scales(n, k) if row_scales else torch.full((n,), 1e-3, device="cuda")
        stages.append((w, ws, torch.tensor(8 / 448, device="cuda")))
    return stages


def gemv_launches(x, stages):
    """The stages as one fp8_gemv launch each (with PDL), as a step runs them today: the last one's output."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv

    for w, ws, xs in stages:
        x = fp8_gemv(x, w, ws, xs, torch.bfloat16)
    return x


def bench_gemm(name, n, k, m, rows, swiglu=False):
    n = -(-n // 16) * 16  # cuBLAS FP8 needs multiples of 16 (lm_head 25256 -> 25264)
    nbytes = n * k
    ws = [fp8_weight(n, k) for _ in range(copies(nbytes))]
    scale = torch.full((n,), 1e-3, device="cuda") if rows else torch.tensor(1e-3, device="cuda")
    xs = torch.tensor(8 / 448, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    linear = ops.fp8_linear_swiglu if swiglu else ops.fp8_linear  # as the model dispatches (GEMV at one token)
    ours = graph_us([lambda w=w: linear(x, w, scale, xs, torch.bfloat16) for w in ws])
    x8 = torch.zeros(16, k, device="cuda", dtype=torch.float8_e4m3fn)  # cuBLAS needs M padded to 16
    one = torch.tensor(1.0, device="cuda")
    cublas = graph_us([lambda w=w: torch._scaled_mm(x8, w.t(), one, one, out_dtype=torch.bfloat16) for w in ws])
    read = graph_us(plain_read(nbytes))
    return (name, m, nbytes / 1e6, ours, cublas, read)


def bench_lm_head(n, k, m):
    """lm_head_quant_algo FP8_PER_CHANNEL_PER_TOKEN (e4m3 rows, activations per token, through fp8_linear as
    the model calls it) against the default BF16 lm_head (torch, cuBLAS) and a plain read of the FP8 bytes."""
    ws = [fp8_weight(n, k) for _ in range(copies(n * k))]
    scale = torch.full((n,), 1e-3, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ours = graph_us([lambda w=w: ops.fp8_linear(x, w, scale, None, torch.float32) for w in ws])
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies(2 * n * k))]
    bf16 = graph_us([lambda w=w: torch.nn.functional.linear(x, w).float() for w in wb])
    return ("lm_head fp8 rows, per-token x (cuBLAS column: the BF16 lm_head)", m, n * k / 1e6, ours, bf16,
            graph_us(plain_read(n * k)))


def moe_case(h, i, e, m, n=8):
    """One MoE FFN at batch m with n rotations: each routes to other experts and uses another shared-expert
    copy, so no call finds its weights in L2. case.fused(j, config) runs rotation j through the fused pair."""
    from types import SimpleNamespace

    c = SimpleNamespace(n=n, s=torch.tensor(1e-3, device="cuda"), xs=torch.tensor(8 / 448, device="cuda"))
    c.gu = (torch.randn(e, 2 * i, h, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    c.dn = (torch.randn(e, h, i, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn)
    c.x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    perm = torch.randperm(e, device="cuda")
    c.ids = [perm.roll(m * j)[:m].view(m, 1) for j in range(n)]  # distinct experts across rotations
    c.sc = torch.rand(m, 1, device="cuda", dtype=torch.bfloat16)
    c.shared = [(fp8_weight(2 * i, h), torch.full((2 * i,), 1e-3, device="cuda"), c.xs, fp8_weight(h, i), c.s, c.xs)
                for _ in range(n)]
    c.routed = lambda j: moe_experts_gemv(c.x, c.ids[j], c.sc, c.gu, c.dn, 0, c.s, c.xs, c.s, c.xs)
    c.fused = lambda j, config=None: moe_experts_gemv(c.x, c.ids[j], c.sc, c.gu, c.dn, 0, c.s, c.xs, c.s, c.xs,
                                                      shared=c.shared[j], config=config)
    return c


def bench_moe(h, i, e, m):
    """The MoE FFN after the router at batch m: the fused kernel pair (selected experts + shared expert)
    against the unfused path of the same math in the same run (routed kernel pair, then the shared expert's
    two FP8 GEMMs and the add), against the routed pair alone and a plain read of the bytes."""
    c = moe_case(h, i, e, m)
    fused = graph_us([lambda j=j: c.fused(j) for j in range(c.n)])

    def unfused(j):
        sgu, sgs, sxs, sdn, sds, sdx = c.shared[j]
        h13 = fp8_gemm_small_m(c.x, sgu, sgs, sxs, torch.bfloat16, swiglu=True)
        return fp8_gemm_small_m(h13, sdn, sds, sdx, torch.bfloat16) + c.routed(j)

    separate = graph_us([lambda j=j: unfused(j) for j in range(c.n)])
    routed = graph_us([lambda j=j: c.routed(j) for j in range(c.n)])
    routed_bytes = m * 3 * h * i  # m distinct experts per call
    total = routed_bytes + 3 * h * i
    return [("moe ffn fused: selected + shared expert, 2 launches", m, total / 1e6, fused, float("nan"),
             graph_us(plain_read(total))),
            ("moe ffn unfused: routed pair + shared fc13, fc2 + add", m, total / 1e6, separate, float("nan"),
             graph_us(plain_read(total))),
            ("routed experts alone (selected)", m, routed_bytes / 1e6, routed, float("nan"),
             graph_us(plain_read(routed_bytes)))]


def bench_router(h, e, m):
    """The MoE router for m tokens: GEMV + top-1 + sigmoid in one launch against cuBLAS's bf16 GEMM plus the
    top-k kernel (the path for many tokens), weights rotated out of L2."""
    from maverick_plugins.kernels.small_ops import router_topk_triton, router_triton

    nbytes = e * h * 2
    ws = [torch.randn(e, h, device="cuda").to(torch.bfloat16) for _ in range(copies(nbytes))]
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    ours = graph_us([lambda w=w: router_triton(x, w, 1) for w in ws])
    logits = graph_us([lambda w=w: router_triton(x, w, 1, pick=False) for w in ws])
    two = graph_us([lambda w=w: router_topk_triton(x @ w.t(), 1) for w in ws])
    read = graph_us(plain_read(nbytes))
    return [("router + top-1 (one launch; cuBLAS column: GEMM + top-k kernel)", m, nbytes / 1e6, ours, two, read),
            ("router logits only, as moe_block's (cuBLAS column: the GEMM)", m, nbytes / 1e6, logits,
             graph_us([lambda w=w: x @ w.t() for w in ws]), read)]


def bench_chain(h, i, layers, rows=4, num_warps=8, waits=True, prefetch=True, dot=False):
    """A chain of 2 x `layers` FP8 GEMVs (h -> i -> h, one token: the dense MLP's fc2-like shapes without
    SwiGLU) as one persistent launch (kernels/persistent_chain.py) against one fp8_gemv launch a stage
    with PDL, as a step runs them today (the cuBLAS column). Over 1 GB of weights: every read from HBM.
    Ablations: waits=False, without the stage waits (its output is wrong; the time is what the tiles cost
    without dependencies); prefetch=False, without asking L2 for the next tile's weights. dot: the products on
    tensor cores."""
    from maverick_plugins.kernels.persistent_chain import DEP0, DEP2, GemvChain

    stages = gemv_chain_stages(h, i, layers)
    chain = GemvChain(stages, rows=rows, num_warps=num_warps, prefetch=prefetch, dot=dot)
    if not waits:
        chain.desc[:, DEP0.value:DEP2.value + 1] = -1
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
    nbytes = 2 * layers * h * i
    return (f"GEMV chain {h}->{i}->{h} x{layers}, rows {rows}, {num_warps} warps, one persistent launch of "
            f"{chain.programs} programs"
            f"{'' if waits else ', NO WAITS (ablation: wrong output)'}{'' if prefetch else ', no L2 prefetch'}"
            f"{', products on tensor cores' if dot else ''} "
            f"(cuBLAS column: a launch a stage)", 1, nbytes / 1e6, graph_us([lambda: chain(x)], reps=2, iters=20),
            graph_us([lambda: gemv_launches(x, stages)], reps=2, iters=20),
            graph_us(plain_read(nbytes), reps=2, iters=20))


def bench_dense_mlp_chain(h, i, layers, rows=4, programs=None, dot=False):
    """`layers` dense MLP blocks of one rank (RMSNorm, fc13 + SwiGLU h -> 2 x i, fc2 i -> h, residual add) as
    one persistent launch, against the launches a step runs for them today (the cuBLAS column: fp8_gemv with
    SwiGLU, fp8_gemv, add_rms_norm: three a block, with PDL). 24 blocks at TP8 are the 24 dense layers' MLPs,
    755 MB."""
    import maverick_plugins as ops
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage

    xs = torch.tensor(8 / 448, device="cuda")
    blocks, stages = [], []
    for b in range(layers):
        w13, w2 = fp8_weight(2 * i, h), fp8_weight(h, i)
        s13, s2 = torch.full((2 * i,), 1e-3, device="cuda"), torch.full((h,), 1e-3, device="cuda")
        g = torch.ones(h, device="cuda", dtype=torch.bfloat16)
        blocks.append((w13, s13, w2, s2, g))
        stages += [ChainStage(w13, s13, xs, swiglu=True, norm_weight=g),
                   ChainStage(w2, s2, xs, residual_from=2 * b - 1)]
    chain = GemvChain(stages, rows=rows, programs=programs, dot=dot)
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)

    def separate():
        res, normed = x, ops.rms_norm(x, blocks[0][4], 1e-5)
        for w13, s13, w2, s2, g in blocks:
            a = fp8_gemv(normed, w13, s13, xs, torch.bfloat16, swiglu=True)
            res, normed = ops.add_rms_norm(res, fp8_gemv(a, w2, s2, xs, torch.bfloat16), g, 1e-5)
        return res

    nbytes = 3 * layers * h * i
    return (f"dense MLP blocks {h}->2x{i}->{h} x{layers}, rows {rows}{', products on tensor cores' if dot else ''}, "
            f"one persistent launch of {chain.programs} programs (cuBLAS column: 3 launches a block)", 1, nbytes / 1e6,
            graph_us([lambda: chain(x)], reps=2, iters=20), graph_us([separate], reps=2, iters=20),
            graph_us(plain_read(nbytes), reps=2, iters=20))


def bench_ffn_chain(h, i_dense, i_moe, experts, layers, rows=4, programs=None, dot=False):
    """The FFN half of `layers` decoder-layer pairs of one rank at batch 1 (Maverick alternates dense and MoE
    layers): a dense MLP block then a MoE block (router, shared and routed fc13 + SwiGLU, both fc2s), each with
    its norm and residual, as one persistent launch; against the launches a step runs for them today (the
    cuBLAS column: fp8_gemv with SwiGLU, fp8_gemv, add_rms_norm; moe_block's router logits and MoE pair,
    add_rms_norm). `experts` a MoE layer (fewer than 128 keeps the weights small; a token reads one either
    way): the bytes a token reads, 24 pairs at TP8 1.54 GB, come from HBM."""
    import maverick_plugins as ops
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv
    from maverick_plugins.kernels.persistent_chain import GemvChain
    from maverick_plugins.persistent import ChainStage

    xs, s = torch.tensor(8 / 448, device="cuda"), torch.tensor(1e-3, device="cuda")
    ones = lambda n: torch.ones(n, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    dense, moe, stages = [], [], []
    for b in range(layers):
        w13, w2, g = fp8_weight(2 * i_dense, h), fp8_weight(h, i_dense), ones(h)
        dense.append((w13, w2, g))
        f = len(stages)
        stages += [ChainStage(w13, s.expand(2 * i_dense), xs, swiglu=True, norm_weight=g),
                   ChainStage(w2, s.expand(h), xs, residual_from=f - 1)]
        router = torch.randn(experts, h, device="cuda", dtype=torch.bfloat16) / 72
        gu = torch.stack([fp8_weight(2 * i_moe, h) for _ in range(experts)])
        dn = torch.stack([fp8_weight(h, i_moe) for _ in range(experts)])
        sgu, sdn = fp8_weight(2 * i_moe, h), fp8_weight(h, i_moe)
        moe.append((router, (gu, dn, 0, s, xs, s, xs), (sgu, s, xs, sdn, s, xs), g))
        f = len(stages)
        stages += [ChainStage(router, None, None, norm_weight=g, router=True),
                   ChainStage(sgu, s.expand(2 * i_moe), xs, swiglu=True, norm_weight=g, input_from=f - 1),
                   ChainStage(gu, s.expand(experts, 2 * i_moe), xs, swiglu=True, norm_weight=g, input_from=f - 1,
                              experts_from=f, scored=True),
                   ChainStage(sdn, s.expand(h), xs, input_from=f + 1, residual_from=f - 1),
                   ChainStage(dn, s.expand(experts, h), xs, input_from=f + 2, residual_from=f + 3, experts_from=f)]
    chain = GemvChain(stages, rows=rows, programs=programs, dot=dot)
    x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)

    def separate():
        res, normed = x, ops.rms_norm(x, dense[0][2], 1e-5)
        for (w13, w2, g), (router, args, shared, g2) in zip(dense, moe):
            a = fp8_gemv(normed, w13, s, xs, torch.bfloat16, swiglu=True)  # a scalar scale: the same products
            res, normed = ops.add_rms_norm(res, fp8_gemv(a, w2, s, xs, torch.bfloat16), g2, 1e-5)
            res, normed = ops.add_rms_norm(res, ops.moe_block(normed, router, 1, *args, *shared), g, 1e-5)
        return res

    nbytes = layers * (3 * h * i_dense + 6 * h * i_moe + 2 * experts * h)
    return (f"FFN half of {layers} layer pairs (dense {h}->2x{i_dense}->{h}; MoE {experts} experts + shared, "
            f"{h}->2x{i_moe}->{h}), rows {rows}{', products on tensor cores' if dot else ''}, one persistent launch "
            f"of {chain.programs} programs (cuBLAS "
            f"column: 5 launches a pair)", 1, nbytes / 1e6, graph_us([lambda: chain(x)], reps=2, iters=20),
            graph_us([separate], reps=2, iters=20), graph_us(plain_read(nbytes), reps=2, iters=20))


def bench_step_start(rows, h, m, half=64):
    """The step's first two kernels (embedding rows of this rank, RoPE cos / sin) against the torch ops they
    replaced (the cuBLAS column); launch-bound at decode sizes, so the bytes are small."""
    from maverick_plugins.kernels.step_start import embedding_rows_triton, rope_cos_sin_triton

    weight = torch.randn(rows, h, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, 8 * rows, (m,), device="cuda")
    pos = torch.randint(0, 1 << 17, (m,), device="cuda")
    inv = 1.0 / 500000 ** (torch.arange(0, 2 * half, 2, device="cuda").float() / (2 * half))
    nbytes = m * h * 2
    embed = ("embedding rows (cuBLAS column: the 8 torch ops)", m, nbytes / 1e6,
             graph_us([lambda: embedding_rows_triton(ids, weight, rows)]),
             graph_us([lambda: ops.embedding_rows_ref(ids, weight, rows)]), graph_us(plain_read(nbytes)))
    rope = ("rope cos/sin (cuBLAS column: the 4 torch ops)", m, m * half * 8 / 1e6,
            graph_us([lambda: rope_cos_sin_triton(pos, inv)]), graph_us([lambda: ops.rope_cos_sin_ref(pos, inv)]),
            graph_us(plain_read(max(m * half * 8, 4096))))
    return [embed, rope]


def bench_attention(ctx, batch, kvh=1, group=5, d=128, bs=64, splits=None):
    nb = -(-ctx // bs)
    blocks = batch * nb
    kc = torch.randn(blocks + 1, bs, kvh, d, device="cuda").to(torch.float8_e4m3fn)
    vc = torch.randn(blocks + 1, bs, kvh, d, device="cuda").to(torch.float8_e4m3fn)
    table = torch.arange(blocks, device="cuda").view(batch, nb)
    q = torch.randn(batch, kvh * group, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kvh, d, device="cuda", dtype=torch.bfloat16)
    ctx_t = torch.full((batch,), ctx - 1, device="cuda")
    qi = torch.arange(batch, device="cuda").view(batch, 1)
    qp = ctx_t.view(batch, 1).clone()
    s = torch.tensor(0.05, device="cuda")
    ours = graph_us([lambda: decode_attention(q, k, k, kc, vc, table, ctx_t, qi, qp, d ** -0.5, None, s, s,
                                              num_splits=splits)])
    nbytes = 2 * batch * ctx * kvh * d
    return (f"attention fp8 ctx={ctx}", batch, nbytes / 1e6, ours, float("nan"), graph_us(plain_read(nbytes)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tp-size", type=int, default=8)
    p.add_argument("--ops", default="gemm,moe,router,attention,step_start", help="comma-separated families to run (also: chain, the persistent GEMV chain and dense MLP blocks)")
    p.add_argument("--tokens", default="1,8", help="comma-separated token counts of the GEMM, MoE, router rows")
    a = p.parse_args(argv)
    families = a.ops.split(",")
    tp = a.tp_size
    H, I, M_, E = 5120, 8192, 16384, 128
    print(f"card={torch.cuda.get_device_name()} tp_size={tp} (per-rank Maverick shapes)")
    print("\n| op | M | MB | ours us | cuBLAS us | plain read us | ours GB/s | read/ours |")
    print("|---|---|---|---|---|---|---|---|")

    def show(*rows):  # each row printed as it is measured: a run cut short still reports what it did
        for name, m, mb, ours, cub, read in rows:
            print(f"| {name} | {m} | {mb:.2f} | {ours:.1f} | {cub:.1f} | {read:.1f} | {mb * 1e3 / ours:.0f} | "
                  f"{read / ours:.0%} |", flush=True)

    shapes = [("qkv", (40 + 16) * 128 // tp, H, True), ("o_proj", H, 40 * 128 // tp, False),
              ("dense fc13", 2 * M_ // tp, H, True), ("dense fc2", H, M_ // tp, False),
              ("shared fc13", 2 * I // tp, H, True), ("shared fc2", H, I // tp, False),
              ("lm_head (static x scale)", 202048 // tp, H, False)]
    for m in (int(t) for t in a.tokens.split(",")):
        for name, n, k, r in shapes if "gemm" in families else ():
            show(bench_gemm(name, n, k, m, r))
        if "gemm" in families:
            show(bench_gemm("dense fc13+swiglu", 2 * M_ // tp, H, m, True, swiglu=True))
            show(bench_lm_head(-(-202048 // tp // 16) * 16, H, m))
        if "moe" in families:
            show(*bench_moe(H, I // tp, E, m))
        if "router" in families:
            show(*bench_router(H, E, m))
        if "step_start" in families:
            show(*bench_step_start(202048 // tp, H, m))
    if "chain" in families:
        for r in (8, 4):
            show(bench_ffn_chain(H, M_ // tp, I // tp, 16, 24, r))
            show(bench_dense_mlp_chain(H, M_ // tp, 24, r))
        show(bench_ffn_chain(H, M_ // tp, I // tp, 16, 24, 8, dot=True))
        show(bench_dense_mlp_chain(H, M_ // tp, 24, 8, dot=True))
        for r, warps, waits, prefetch, dot in ((8, 8, True, True, False), (4, 8, True, True, False),
                                               (8, 8, True, False, False), (8, 8, False, True, False),
                                               (8, 8, True, True, True), (8, 8, False, True, True),
                                               (4, 8, True, True, True)):
            show(bench_chain(H, M_ // tp, 48, r, warps, waits, prefetch, dot))
    for ctx in (1024, 8192, 131072) if "attention" in families else ():
        for b in (1, 8):
            show(bench_attention(ctx, b))


if __name__ == "__main__":
    sys.exit(main())
