#!/usr/bin/env python3
"""The 48-layer GEMM chain: one dense TP8 layer's FP8 GEMMs 48 times against the HBM bandwidth.

qkv 896x5120, o 5120x640, fc13+SwiGLU 4096x5120, fc2 5120x2048, one token, each layer with its own weights
(1.89 GB: nothing is left in L2), in one CUDA graph. Bytes / time against the HBM read bandwidth measured in
the same run, for our one-token GEMV without and with programmatic dependent launch, and for cuBLAS
(torch._scaled_mm). `--smoke`: tiny shapes, eager, on CPU (Triton interpreter) or GPU: checks the chain.
Run: `maverick-bench chain`.
"""
import argparse
import sys

import torch

from maverick.bench.timing import git_commit, median_ms

SHAPES = {"qkv": (896, 5120), "o": (5120, 640), "fc13": (4096, 5120), "fc2": (5120, 2048)}  # [out, in]
MODES = ["ours", "ours+pdl", "cublas"]
SMOKE = {"qkv": (48, 32), "o": (32, 16), "fc13": (64, 32), "fc2": (32, 32)}


def make_layers(n_layers: int, shapes: dict, device: str) -> list[dict]:
    def w(n, k):
        return (torch.randn(n, k, device=device) * 32).clamp(-448, 448).to(torch.float8_e4m3fn)

    return [{name: w(*shape) for name, shape in shapes.items()} for _ in range(n_layers)]


def chain(x: torch.Tensor, layers: list[dict], gemm) -> torch.Tensor:
    """x [1, hidden] through every layer: qkv -> (its first o-input columns stand in for attention)
    -> o -> fc13 + SwiGLU -> fc2."""
    for lw in layers:
        y = gemm(x, lw["qkv"], False)
        y = gemm(y[:, : lw["o"].shape[1]].contiguous(), lw["o"], False)
        y = gemm(y, lw["fc13"], True)
        x = gemm(y, lw["fc2"], False)
    return x


def ours(scale, in_scale):
    """What the model runs for one token (dispatch.linear picks it): the register GEMV."""
    from maverick_plugins.kernels.fp8_gemv import fp8_gemv

    return lambda x, w, swiglu: fp8_gemv(x, w, scale, in_scale, x.dtype, swiglu=swiglu)


def cublas(scale, in_scale):
    import maverick_plugins as ops

    def gemm(x, w, swiglu):
        y = ops.fp8.fp8_linear_cublas(x, w, scale, in_scale, x.dtype)
        return ops.swiglu(y) if swiglu else y
    return gemm


def run_mode(mode: str, smoke: bool) -> dict:
    from maverick_plugins import dispatch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # smoke on CPU runs kernels in the interpreter
    shapes = SMOKE if smoke else SHAPES
    n_layers = 2 if smoke else 48
    layers = make_layers(n_layers, shapes, device)
    scale = torch.tensor(1 / (32 * 64.0), device=device)
    in_scale = torch.tensor(8 / 448, device=device)
    dtype = torch.float32 if smoke else torch.bfloat16
    x = torch.randn(1, shapes["qkv"][1], device=device, dtype=dtype)
    gemm = cublas(scale, in_scale) if mode == "cublas" else ours(scale, in_scale)
    nbytes = sum(w.numel() for lw in layers for w in lw.values())
    with dispatch.use(dispatch.KernelOptions(pdl=mode == "ours+pdl")):
        if smoke:
            out = chain(x, layers, gemm)
            return {"mode": mode, "bytes": nbytes, "shape": list(out.shape), "finite": bool(torch.isfinite(out).all())}
        from maverick.bench.measure import hbm_read_bandwidth

        bw = hbm_read_bandwidth()
        chain(x, layers, gemm)  # compile, warm up
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            chain(x, layers, gemm)
    ms = median_ms(g.replay, iters=30)
    return {"mode": mode, "bytes": nbytes, "ms": ms, "bandwidth": bw, "achieved": nbytes / (ms / 1e3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maverick-bench chain", description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, eager, CPU: checks the chain runs")
    a = p.parse_args(argv)
    rows = [run_mode(mode, a.smoke) for mode in MODES]
    if a.smoke:
        for r in rows:
            print(r)
        return 0 if all(r["finite"] and r["shape"] == [1, SMOKE["fc2"][0]] for r in rows) else 1
    print(f"card={torch.cuda.get_device_name()} gpus=1 commit={git_commit()} chain: 48 dense TP8 layers x "
          f"(qkv, o, fc13+SwiGLU, fc2), 1 token, {rows[0]['bytes'] / 1e9:.2f} GB of FP8 weights, one CUDA graph")
    print("| kernels | chain ms | achieved TB/s | HBM read TB/s (same process) | share of bandwidth |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ms']:.3f} | {r['achieved'] / 1e12:.2f} | {r['bandwidth'] / 1e12:.2f} | "
              f"{r['achieved'] / r['bandwidth']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
