#!/usr/bin/env python3
"""Offline tuning: time each low-latency kernel config on the per-rank Maverick shapes (CUDA graphs,
weights rotated out of L2) and print the best per shape, to be copied into the kernels' tables."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import maverick  # noqa: E402,F401
from bench_kernels import copies, fp8_weight, graph_ms  # noqa: E402
from maverick_plugins.kernels.fp8_gemm import fp8_gemm_small_m  # noqa: E402
from maverick_plugins.kernels.moe_gemv import moe_experts_gemv  # noqa: E402


def tune_gemm(n, k, m=1):
    ws = [fp8_weight(n, k) for _ in range(copies(n * k))]
    sc, xs = torch.tensor(1e-3, device="cuda"), torch.tensor(8 / 448, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    best = []
    for bn in (16, 32, 64):
        for bk in (256, 512):
            for sk in (1, 2, 4, 8):
                for nw, ns in ((4, 3), (4, 4), (8, 3)):
                    cfg = (bn, bk, sk, nw, ns)
                    try:
                        t = graph_ms([lambda w=w: fp8_gemm_small_m(x, w, sc, xs, torch.bfloat16, config=cfg)
                                      for w in ws], iters=15)
                    except Exception:
                        continue
                    best.append((t, *cfg))
    best.sort()
    return best[:3]


def tune_moe(h, i, e=128, m=1):
    gu = [(torch.randn(e, 2 * i, h, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(2)]
    dn = [(torch.randn(e, h, i, device="cuda") * 32).clamp(-448, 448).to(torch.float8_e4m3fn) for _ in range(2)]
    s, xs = torch.tensor(1e-3, device="cuda"), torch.tensor(8 / 448, device="cuda")
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, e, (m, 1), device="cuda")
    sc = torch.rand(m, 1, device="cuda", dtype=torch.bfloat16)
    best = []
    for bn in (2, 4, 8):
        for bk in (512, 1024, 2048):
            for nw in (2, 4):
                t = graph_ms([lambda a=a, b=b: moe_experts_gemv(x, ids, sc, a, b, 0, s, xs, s, xs, config=(bn, bk, nw))
                              for a, b in zip(gu, dn)], iters=15)
                best.append((t, bn, bk, nw))
    best.sort()
    return best[:3]


def tune_attention(ctx, batch):
    from bench_kernels import bench_attention

    return [(round(bench_attention(ctx, batch, splits=sp)[3], 1), sp) for sp in (4, 8, 16, 32, 64, 128)]


if __name__ == "__main__":
    for ctx in (1024, 8192):
        for b in (1, 8):
            print("attention", ctx, b, tune_attention(ctx, b), flush=True)
    H, I, M_ = 5120, 8192, 16384
    for name, n, k in [("qkv", 896, H), ("o_proj", H, 640), ("dense fc13", 4096, H), ("dense fc2", H, 2048),
                       ("shared fc13", 2048, H), ("shared fc2", H, 1024), ("lm_head", 25264, H)]:
        print(name, n, k, [(round(t, 1), *c) for t, *c in tune_gemm(n, k)], flush=True)
    print("moe", [(round(t, 1), *c) for t, *c in tune_moe(H, I // 8)], flush=True)
