"""maverick-bench step (ttft, e2e, sweep, peer): full-size Maverick on the GPUs we have.

One-rank mode (the default): rank 0 of TP=N does its full per-rank work (all 48 layers at per-rank
shapes, random FP8 weights made on the GPU) on one GPU; the all-reduces are not run, their cost is
reported apart from a latency given with --allreduce-us (measured on a multi-GPU machine).
Ranks mode (`torchrun --nproc_per_node=N -m maverick.bench step`): TP=N for real, each rank its own
synthetic weights, all-reduces run (the fused one-shot; NCCL with MAVERICK_FUSED_ALLREDUCE=0) and their
measured latency joins the floor. Every figure is timed with CUDA events over CUDA-graph replays
(median), next to the roofline measured in the same run: HBM read bandwidth, the bytes the step must
read, floor = bytes / bandwidth (+ all-reduces x their latency). Also: time to first token, an
ISL/OSL concurrency sweep (maverick/bench/sweep.py), end-to-end engine runs (bench/e2e.py) and a
transformers peer baseline (bench/peer.py). The measurements themselves: maverick/bench/measure.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import dataclasses
from dataclasses import asdict
from pathlib import Path

import torch

from maverick.bench.floors import fp8_peak_flops, step_work
from maverick.bench.timing import git_commit
from maverick.bench.measure import (allreduce_us, decode_step, hbm_read_bandwidth, kv_blocks, prefill_graph_ms,
                                    prefill_step_ms, time_to_first_token)
from maverick.builder.synthetic import synthetic_model
from maverick.config import BuildConfig, ModelConfig, QuantConfig
from maverick.runtime.cuda_graph import graph_shape
from maverick.runtime.model_runner import ModelRunner


GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def run_e2e(runner: ModelRunner, cfg: ModelConfig, workloads, concurrency, max_num_tokens: int, tp_size: int,
            rank: int, world: int, say, overlap: bool = True, prefill_tokens: list[int] = (),
            floors: tuple | None = None) -> list:
    """Every rank captures the decode graphs; rank 0 runs the engine loop and sends each step's plan to
    the other ranks, which follow (the LLM's own arrangement). floors: (model, build, bandwidth, FP8 peak)
    to give each point its floor."""
    from maverick import distributed
    from maverick.bench.e2e import inflight_run, run_floor_s
    from maverick.runtime.worker import STOP, serve_steps

    runner.warmup(max_num_tokens)  # compile the prefill kernels now, not in the first request's TTFT
    runner.capture_cuda_graphs([s for s in GRAPH_SIZES if s <= max(concurrency)], prefill_tokens)
    points = []
    if rank == 0:
        send = (lambda plan, rows: distributed.broadcast_object((plan, rows))) if world > 1 else None
        for isl, osl in workloads:
            for c in concurrency:
                pt = inflight_run(runner, isl, osl, c, max_num_tokens, tp_size, cfg.vocab_size, send, overlap)
                if floors is not None:
                    model, build, bw, peak = floors
                    pt.floor_s = run_floor_s(step_work(model, cfg, build, c, isl, 0),
                                             step_work(model, cfg, build, c, 1, isl + osl // 2), osl, bw, peak)
                points.append(pt)
                say("  e2e " + points[-1].row(), flush=True)
        if world > 1:
            distributed.broadcast_object(STOP)
    else:
        serve_steps(runner)
    runner.release_graphs()
    return points


def _prefill_as_run(runner: ModelRunner, build: BuildConfig, prompts: int, prompt_len: int) -> float:
    """One prefill step's ms as the runtime runs it: a lone prompt up to the largest prefill graph replays
    that graph (padded up), others eagerly (several prompts of up to 256 graph tokens together run as
    separate replays in the runtime, faster than this eager figure)."""
    shape = graph_shape([prompt_len] * prompts, [1] * prompts, [], build.graph_prefill_tokens())
    if shape is not None:
        return prefill_graph_ms(runner, prompt_len, shape[1])
    return prefill_step_ms(runner, prompts, prompt_len)


def _point(pt) -> dict:
    """A sweep or end-to-end point with its two rates (what the Pareto plot reads)."""
    return dict(asdict(pt), tokens_per_s_per_user=pt.tokens_per_s_per_user, tokens_per_s_per_gpu=pt.tokens_per_s_per_gpu)


def print_peer(say, peer: list[tuple[str, float]]) -> None:
    say("\npeer baseline, reduced Maverick (4 layers at full width, 16 experts), batch 1, same card, same process:")
    say("| engine | ms per token | tokens/s | transformers / this |\n|---|---|---|---|")
    for name, ms in peer:
        say(f"| {name} | {ms:.2f} | {1e3 / ms:.1f} | {peer[0][1] / ms:.1f}x |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maverick-bench", description=__doc__)
    p.add_argument("--preset", default="maverick")
    p.add_argument("--tp-size", type=int, default=8,
                   help="one-rank mode: per-rank shapes of this TP size (under torchrun: the world size)")
    p.add_argument("--batches", default="1,4,8,16", help="decode batch sizes")
    p.add_argument("--contexts", default="1024,8192")
    p.add_argument("--kv-cache-dtype", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--lm-head-fp8", action="store_true", help="lm_head_quant_algo FP8_PER_CHANNEL_PER_TOKEN")
    p.add_argument("--reference", action="store_true", help="also time batch 1 with the kernels off")
    p.add_argument("--persistent", action="store_true",
                   help="also time batch 1 at each context with MAVERICK_PERSISTENT's path (each layer as attention "
                        "+ one persistent launch), in the same run on the same weights (one rank only)")
    p.add_argument("--ttft", default="", help="prompt lengths for time to first token, e.g. 1024,8192")
    p.add_argument("--sweep", default="", help="ISL/OSL workloads for the concurrency sweep, e.g. 128/2048,1024/2048")
    p.add_argument("--concurrency", default="1,4,16,64,256", help="concurrency levels of the sweep")
    p.add_argument("--max-num-tokens", type=int, default=8192, help="tokens per prefill step in the sweep")
    p.add_argument("--e2e", default="", help="ISL/OSL workloads run end to end through the engine loop at each "
                                             "--concurrency (in-flight batching, chunked prefill, graphs)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="end-to-end runs read each step's tokens before queuing the next (A/B of the overlap "
                        "scheduler)")
    p.add_argument("--no-prefill-graphs", dest="prefill_graphs", action="store_false",
                   help="e2e: run prefill steps eagerly (A/B against the prefill CUDA graphs)")
    p.add_argument("--peer-baseline", action="store_true",
                   help="transformers vs maverick on a reduced Maverick (4 layers, 16 experts), one GPU")
    p.add_argument("--allreduce-us", type=float, help="one-rank mode: one all-reduce's latency, measured elsewhere")
    p.add_argument("--json", help="write results here")
    p.add_argument("--pdl", choices=["on", "off"],
                   help="programmatic dependent launch: the next kernel launches once every program of the current "
                        "one passed its main loop; default: MAVERICK_PDL, else on")
    p.add_argument("--no-splitk-serial", dest="splitk_serial", action="store_false",
                   help="split-K GEMMs reduce in a second (epilogue) launch instead of their last split")
    a = p.parse_args(argv)
    from maverick_plugins.dispatch import KernelOptions

    from maverick import envs

    kernels = KernelOptions(pdl=envs.pdl() if a.pdl is None else a.pdl == "on", splitk_serial=a.splitk_serial)
    if not torch.cuda.is_available():
        print("error: maverick-bench needs a CUDA GPU", file=sys.stderr)
        return 2
    from maverick import distributed, envs
    from maverick.bench.sweep import HEADER, SweepPoint, parse_workloads, prefill_ms

    rank, world, local_rank = envs.torchrun_world() or (0, 1, 0)
    if world > 1:  # torchrun: every rank runs its share for real, all-reduces included
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        distributed.init(rank, world, "nccl", "env://")
        a.tp_size = world
        import faulthandler

        faulthandler.dump_traceback_later(120, repeat=True)  # a rank stuck in a collective names where
        if a.peer_baseline:
            print("error: --peer-baseline runs on one GPU: run it without torchrun", file=sys.stderr)
            return 2
    else:
        device = torch.device("cuda")
    say = print if rank == 0 else (lambda *x, **k: None)
    cfg = ModelConfig.preset(a.preset)
    batches = [int(x) for x in a.batches.split(",") if x]
    contexts = [int(x) for x in a.contexts.split(",") if x]
    ttfts = [int(x) for x in a.ttft.split(",") if x]
    workloads = parse_workloads(a.sweep) if a.sweep else []
    e2e_workloads = parse_workloads(a.e2e) if a.e2e else []
    concurrency = [int(x) for x in a.concurrency.split(",") if x]
    # what each part runs: (sequences, tokens per sequence), for the KV pool and the graph sizes
    plans = [(b, c + 1) for b in batches for c in contexts] + [(1, n) for n in ttfts]
    plans += [(c, isl + osl // 2 + 1) for isl, osl in workloads for c in concurrency]
    plans += [(max(1, min(c, a.max_num_tokens // isl)), isl) for isl, _ in workloads for c in concurrency]
    plans += [(c, isl + osl + 1) for isl, osl in e2e_workloads for c in concurrency]
    if not plans and not a.peer_baseline:
        print("error: nothing to run: give --batches and --contexts, --ttft, --sweep or --peer-baseline",
              file=sys.stderr)
        return 2
    longest = max((n for _, n in plans), default=1)
    max_batch = max((b for b, _ in plans), default=1)
    build = BuildConfig(tp_size=a.tp_size, max_batch_size=max_batch, max_seq_len=longest + 64,
                        max_num_tokens=a.max_num_tokens,
                        quant=QuantConfig("FP8", "FP8" if a.kv_cache_dtype == "fp8" else None),
                        kv_cache_block_size=64,
                        lm_head_quant_algo="FP8_PER_CHANNEL_PER_TOKEN" if a.lm_head_fp8 else None)
    card = torch.cuda.get_device_name()
    mode = "one-rank" if world == 1 else "ranks"
    head = (f"card={card} gpus={world} mode={mode} tp_size={a.tp_size} preset={a.preset} "
            f"pdl={'on' if kernels.pdl else 'off'} splitk_serial={a.splitk_serial} overlap={a.overlap} "
            f"lm_head={'fp8' if a.lm_head_fp8 else 'bf16'} prefill_graphs={a.prefill_graphs} "
            f"commit={git_commit()} "
            f"command={' '.join(sys.argv)}")
    say(head, flush=True)
    bw = hbm_read_bandwidth()
    say(f"HBM read bandwidth (4 GiB reduction, graph replay, median): {bw / 1e12:.2f} TB/s", flush=True)
    peak = fp8_peak_flops()
    say(f"FP8 dense peak (8192^3 e4m3 GEMM, torch._scaled_mm, graph replay, median): {peak / 1e12:.0f} TFLOP/s",
        flush=True)
    if not plans:  # the peer baseline alone
        from maverick.bench.peer import peer_baseline

        print_peer(say, peer_baseline(bw))
        return 0
    t0 = time.time()
    model = synthetic_model(cfg, build, rank, device)
    torch.cuda.synchronize()
    wbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    say(f"synthetic rank-{rank} weights: {wbytes / 1e9:.2f} GB in {time.time() - t0:.1f} s", flush=True)
    n_ar = 2 * cfg.num_hidden_layers
    ar_us = a.allreduce_us
    if world > 1:
        fused = distributed.enable_fused_all_reduce(model, device)
        ar_us = allreduce_us(model, device)
        distributed.check_peer_all_reduce()
        say(f"all-reduce + add + RMSNorm, 1 token, {'fused one-shot over peer buffers' if fused else 'NCCL'}: "
            f"{ar_us:.2f} us per call (graph of {n_ar} calls, median), {n_ar} per step", flush=True)
    g_blocks, l_blocks = kv_blocks(cfg, build.kv_cache_block_size, plans)
    runner = ModelRunner(model, max_seq_len=build.max_seq_len, max_batch_size=max_batch,
                         block_size=build.kv_cache_block_size, device=device,
                         num_global_blocks=g_blocks, num_local_blocks=l_blocks, kernel_options=kernels)
    rows = []
    for ctx in contexts:
        for b in batches:
            r = decode_step(runner, cfg, build, b, ctx, bw, a.tp_size, peak)
            distributed.check_peer_all_reduce()
            if ar_us and world > 1:  # the step ran its all-reduces: they belong in its floor
                r.floor_ms += n_ar * ar_us / 1e3
            rows.append(("kernels", r))
            say(f"  decode b={b} ctx={ctx}: {r.step_ms:.3f} ms/step, floor {r.floor_ms:.3f} ms (bytes "
                f"{r.bytes_floor_ms:.3f} ms for {r.bytes_per_step / 1e9:.3f} GB, FLOPs {r.flop_floor_ms:.3f} ms for "
                f"{r.flops_per_step / 1e12:.2f} TFLOP), {r.ratio:.0%} of the floor", flush=True)
    if a.persistent:  # after the plain rows, on the same weights (the chains share them): an in-run A/B
        for dot in (False, True):  # the chains' products by FMAs, then on tensor cores
            model.use_persistent(dot)
            path = "persistent, tensor cores" if dot else "persistent"
            for ctx in contexts:
                r = decode_step(runner, cfg, build, 1, ctx, bw, a.tp_size, peak)
                rows.append((path, r))
                say(f"  decode b=1 ctx={ctx}, {path} tails: {r.step_ms:.3f} ms/step, {r.ratio:.0%} of the floor",
                    flush=True)
        model.tails = None  # the rest of the run as without the flag
    ttft = {}
    for n in ttfts:
        shape = graph_shape([n], [1], [], build.graph_prefill_tokens())
        graph_tokens = n if shape is None else shape[1]  # past the largest size: a graph of exactly n
        by, fl = step_work(model, cfg, build, 1, n, 0).floor_ms(bw, peak)
        ttft[n] = (time_to_first_token(runner, n), prefill_graph_ms(runner, n, graph_tokens), graph_tokens, by, fl)
        say(f"  time to first token, {n}-token prompt: eager prefill {ttft[n][0]:.1f} ms, prefill CUDA graph of "
            f"{graph_tokens} tokens {ttft[n][1]:.1f} ms; floor {max(by, fl):.2f} ms (bytes {by:.2f}, FLOPs {fl:.2f}), "
            f"{max(by, fl) / min(ttft[n][:2]):.0%} of it", flush=True)
    if a.reference:
        runner.kernel_options = dataclasses.replace(kernels, enabled=False)
        r = decode_step(runner, cfg, build, 1, contexts[0], bw, a.tp_size, peak)
        runner.kernel_options = kernels
        rows.append(("reference", r))
    sweep = []
    for isl, osl in workloads:
        for c in concurrency:
            pre = prefill_ms(lambda n, L: _prefill_as_run(runner, build, n, L), c, isl, a.max_num_tokens)
            step = decode_step(runner, cfg, build, c, isl + osl // 2, bw, a.tp_size).step_ms
            sweep.append(SweepPoint(isl, osl, c, pre, step, a.tp_size))
            say("  sweep " + sweep[-1].row(), flush=True)
    e2e = run_e2e(runner, cfg, e2e_workloads, concurrency, a.max_num_tokens, a.tp_size, rank, world, say,
                  a.overlap, build.graph_prefill_tokens() if a.prefill_graphs else [], (model, build, bw, peak)) \
        if e2e_workloads else []
    peer = []
    if a.peer_baseline:
        del runner, model
        torch.cuda.empty_cache()
        from maverick.bench.peer import peer_baseline

        peer = peer_baseline(bw)
    say("\n| path | batch | context | step ms | bytes floor ms | FLOP floor ms | floor/step | tok/s/user | "
        "tok/s/GPU (TP) |")
    say("|---|---|---|---|---|---|---|---|---|")
    for path, r in rows:
        say(f"| {path} | {r.batch} | {r.context} | {r.step_ms:.3f} | {r.bytes_floor_ms:.3f} | {r.flop_floor_ms:.3f} | "
            f"{r.ratio:.0%} | {r.tokens_per_s_per_user:.0f} | {r.tokens_per_s_per_gpu:.0f} |")
    if ttft:
        say("\n| prompt tokens | eager prefill ms | graph tokens | prefill graph replay ms | bytes floor ms | "
            "FLOP floor ms | floor/best |\n|---|---|---|---|---|---|---|")
        for n, (eager, graph, tokens, by, fl) in ttft.items():
            say(f"| {n} | {eager:.1f} | {tokens} | {graph:.1f} | {by:.2f} | {fl:.2f} | {max(by, fl) / min(eager, graph):.0%} |")
    if sweep:
        say("\nconcurrency sweep (MODEL over measured parts: c prompts prefilled, then OSL steps at batch c timed "
            "at context ISL + OSL/2; maverick/bench/sweep.py)")
        say(HEADER)
        for pt in sweep:
            say(pt.row())
    if e2e:
        from maverick.bench.e2e import HEADER as E2E_HEADER

        say("\nend to end through the engine loop (MEASURED: in-flight batching, chunked prefill, graphs, sampling; "
            f"{'no all-reduces in one-rank mode' if world == 1 else 'all-reduces run'})")
        say(E2E_HEADER)
        for pt in e2e:
            say(pt.row())
    if peer:
        print_peer(say, peer)
    if world == 1 and ar_us:
        say(f"all-reduces not run in one-rank mode: {n_ar} x {ar_us} us = {n_ar * ar_us / 1e3:.3f} ms per step")
    b200_bw = 8e12
    one = next((r for p_, r in rows if p_ == "kernels" and r.batch == 1), None)
    if one is not None:
        ar_note = f" + {n_ar} x {ar_us:.1f} us all-reduces (as measured here)" if ar_us else f" + {n_ar} all-reduces"
        say(f"PROJECTION (not measured) DGX B200 TP8 batch 1 ctx {one.context}: floor "
            f"{one.bytes_per_step * a.tp_size / 8 / b200_bw * 1e3:.3f} ms/step at 8 TB/s{ar_note}")
    if a.json and rank == 0:
        Path(a.json).write_text(json.dumps({
            "header": head, "bandwidth_Bps": bw, "fp8_peak_flops": peak, "allreduce_us": ar_us,
            "rows": [dict(path=p_, **asdict(r)) for p_, r in rows], "ttft_ms": {n: dict(eager=e, graph=g, graph_tokens=t, bytes_floor=by, flop_floor=fl)
                                                                             for n, (e, g, t, by, fl) in ttft.items()},
            "sweep": [_point(pt) for pt in sweep], "e2e": [_point(pt) for pt in e2e],
            "peer": [{"engine": n, "ms_per_token": ms} for n, ms in peer]}, indent=1))
    if world > 1:
        faulthandler.cancel_dump_traceback_later()
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
