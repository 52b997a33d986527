#!/usr/bin/env python3
"""Offline tuning: time each low-latency kernel config on the per-rank Maverick shapes (CUDA graphs,
weights rotated out of L2) and print the best per shape, to be copied into maverick_plugins/dispatch.py's table."""
import sys

import torch

from maverick.bench.kernels import copies, fp8_weight, moe_case
from maverick.bench.timing import graph_us
from maverick_plugins.kernels.fp8_gemm import fp8_gemm_small_m


def tune_gemm(n, k, m=1, swiglu=False):
    ws = [fp8_weight(n, k) for _ in range(copies(n * k))]
    sc, xs = torch.tensor(1e-3, device="cuda"), torch.tensor(8 / 448, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    best = []
    grid = [(bn, 256, sk, 4, 3, False) for bn in (32, 64) for sk in (1, 2, 4, 8)]  # x W^T: mma.sync
    grid += [(bn, bk, sk, nw, ns, True) for bn in (64, 128) for bk in (128, 256, 512) for sk in (1, 2, 4, 8, 16)
             for nw, ns in ((4, 3), (4, 4), (8, 3)) if nw == 4 or bn == 128]  # W x^T: wgmma
    failed = 0
    for cfg in grid:
        try:
            t = graph_us([lambda w=w: fp8_gemm_small_m(x, w, sc, xs, torch.bfloat16, swiglu=swiglu, config=cfg)
                          for w in ws], iters=15)
        except Exception:  # e.g. more shared memory than the card has: not a candidate
            failed += 1
            continue
        best.append((t, *cfg))
    best.sort()
    plain = [b for b in best if not b[-1]][:1]  # the best without swap-AB, for the comparison
    return best[:3] + plain, failed


def tune_gemv(n, k, m=1, swiglu=False, dynamic=False):
    """The register-resident GEMV (kernels/fp8_gemv.py): (BLOCK_N, warps) by time, each call with PDL (the
    default) after another of the same shape, as in a decode step; against the split-K GEMM and a plain read.
    dynamic: activations quantized per token in the kernel (the FP8 lm_head; the GEMM column then has a
    static scale)."""
    from maverick.bench.kernels import plain_read
    from maverick_plugins.dispatch import gemv_default
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv

    ws = [fp8_weight(n, k) for _ in range(copies(n * k))]
    sc, xs = torch.tensor(1e-3, device="cuda"), torch.tensor(8 / 448, device="cuda")
    xg = None if dynamic else xs
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    n_out = n // 2 if swiglu else n
    rows = []
    for bn in (1, 2, 4, 8, 16, 32, 64):
        for nw in (2, 4, 8, 16):
            if bn * k * (2 if swiglu else 1) > 96 * 1024 or n_out // bn < 32 or bn * k < nw * 32 * 16:
                continue
            rows.append((graph_us([lambda w=w: fp8_gemv(x, w, sc, xg, torch.bfloat16, swiglu=swiglu, config=(bn, nw))
                                   for w in ws], iters=15), bn, nw))
    gemm = graph_us([lambda w=w: fp8_gemm_small_m(x, w, sc, xs, torch.bfloat16, swiglu=swiglu) for w in ws], iters=15)
    dflt = gemv_default(n_out, k, swiglu)
    dflt_t = graph_us([lambda w=w: fp8_gemv(x, w, sc, xg, torch.bfloat16, swiglu=swiglu, config=dflt) for w in ws],
                      iters=15)
    return sorted(rows)[:4], (round(dflt_t, 2), *dflt), gemm, graph_us(plain_read(n * k), iters=15)


def tune_moe(h, i, e=128, m=1):
    """The fused MoE pair (selected experts + shared expert): pass 1's config with pass 2 at the default,
    then pass 2's with the best pass 1 (kernels.moe_case: no call finds its weights in L2)."""
    from maverick_plugins.dispatch import H200

    c = moe_case(h, i, e, m)

    def time(cfg):
        return graph_us([lambda j=j: c.fused(j, cfg) for j in range(c.n)], iters=15)

    # (BLOCK_N, BLOCK_K, warps, stages, MODE): the CUDA-core configs of the last tuning, then mma.sync (MODE 1)
    # and wgmma (MODE 2) tiles
    grid = [(2, 2048, 4, 3, 0), (8, 1024, 8, 3, 0), (8, 256, 2, 3, 0), (8, 512, 2, 3, 0)]
    grid += [(bn, bk, nw, ns, 1) for bn in (16, 32) for bk in (128, 256, 512) for nw in (2, 4) for ns in (2, 3, 4)]
    grid += [(64, bk, 4, ns, 2) for bk in (128, 256) for ns in (2, 3, 4)]
    # pass 1 split over H (the last split applies SwiGLU): more programs where few rows leave SMs idle
    splits = [(bn, bk, 4, ns, mode, sk) for bn, mode in ((16, 1), (64, 2)) for bk in (128, 256) for ns in (3, 4)
              for sk in (2, 4, 8)]
    first = sorted((time((c_, H200.moe_config(1)[1])), c_) for c_ in grid + splits)
    second = sorted((time((first[0][1], c_)), c_) for c_ in grid)
    cuda_cores = [min(r for r in first if r[1][-1] == 0), min(r for r in second if r[1][-1] == 0)]
    return first[:3] + cuda_cores[:1], second[:3] + cuda_cores[1:]


def tune_attention(ctx, batch):
    from maverick.bench.kernels import bench_attention

    return [(round(bench_attention(ctx, batch, splits=sp)[3], 1), sp) for sp in (8, 16, 32, 64, 128, 256)]


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--parts", default="attention,gemm,gemv,moe", help="comma-separated: attention, gemm, gemv, moe")
    p.add_argument("--gemv-tokens", default="1", help="comma-separated token counts of the GEMV tuning")
    p.add_argument("--moe-tokens", default="1,8", help="comma-separated token counts of the MoE tuning")
    p.add_argument("--tp-size", type=int, default=8, help="per-rank shapes of this tensor-parallel size")
    p.add_argument("--gemms", default="", help="comma-separated GEMM names to tune (default: all), e.g. qkv,o_proj")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    for ctx in (1024, 8192, 131072) if "attention" in parts else ():
        for b in (1, 8):
            print("attention", ctx, b, tune_attention(ctx, b), flush=True)
    H, I, M_ = 5120, 8192, 16384
    tp = args.tp_size  # per-rank Maverick shapes: 40 query heads, 8 kv heads of 128
    gemms = [("qkv", (40 + 16) * 128 // tp, H, False), ("o_proj", H, 40 * 128 // tp, False),
             ("dense fc13", 2 * M_ // tp, H, True), ("dense fc2", H, M_ // tp, False),
             ("shared fc13", 2 * I // tp, H, True), ("shared fc2", H, I // tp, False),
             ("lm_head", -(-202048 // tp // 16) * 16, H, False)]
    chosen = [g for g in gemms if not args.gemms or g[0] in args.gemms.split(",")]
    for name, n, k, swiglu in chosen if "gemm" in parts else ():
        best, failed = tune_gemm(n, k, swiglu=swiglu)
        print(name, n, k, f"swiglu={swiglu}", [(round(t, 1), *c) for t, *c in best], f"({failed} configs failed)",
              flush=True)
    for name, n, k, swiglu in chosen if "gemv" in parts else ():
        for m in [int(t) for t in args.gemv_tokens.split(",")]:  # lm_head: the FP8_PER_CHANNEL_PER_TOKEN option
            best, dflt, gemm, read = tune_gemv(n, k, m, swiglu, dynamic=name == "lm_head")
            print(f"gemv {name} {n}x{k} m={m} swiglu={swiglu}: (us, BLOCK_N, warps)",
                  [(round(t, 2), *c) for t, *c in best], f"gemv_default {dflt}, split-K GEMM {gemm:.2f} us,",
                  f"plain read {read:.2f} us", flush=True)
    for m in [int(t) for t in args.moe_tokens.split(",")] if "moe" in parts else ():
        p1, p2 = tune_moe(H, I // 8, m=m)
        print(f"moe ffn m={m} pass 1 (pass 2 default):", [(round(t, 1), c) for t, c in p1],
              "pass 2 (best pass 1):", [(round(t, 1), c) for t, c in p2], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
