"""maverick-bench compiles: what serving still compiles or captures after the engine has loaded.

Full Maverick shapes, one rank of TP8 (random FP8 weights), the runtime's own load sequence (warm-up, decode
and prefill CUDA graphs), then requests of every batch size up to max_batch_size and prompts of every size
class up to max_num_tokens through the engine loop. Every Triton JIT specialization made in that window (the
kernel and its signature: each one a compile, or a disk-cache load at best) and every CUDA graph capture is
counted and listed, with the time of the load and of the first token after it. With --max-draft-len K, an
EAGLE-3 draft at NVIDIA's Maverick head shapes (random weights) is attached too, and requests run long enough
for steady rounds: its eager rounds, round graphs and verify graphs are counted with the rest.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from maverick.bench.timing import git_commit


@dataclass
class CompileLog:
    compiles: list[str] = field(default_factory=list)
    captures: int = 0


@contextlib.contextmanager
def watch():
    """Count Triton JIT specializations (knobs.runtime.jit_cache_hook: called before each one) and CUDA graph
    captures inside the block."""
    from triton import knobs

    log = CompileLog()
    before = knobs.runtime.jit_cache_hook

    def hook(*, fn, compile, **kw):
        log.compiles.append(describe(fn.name, [q.name for q in fn.jit_function.params], compile))
        return before(fn=fn, compile=compile, **kw) if before else False

    begin = torch.cuda.CUDAGraph.capture_begin

    def capture_begin(self, *a, **k):
        log.captures += 1
        return begin(self, *a, **k)

    knobs.runtime.jit_cache_hook = hook
    torch.cuda.CUDAGraph.capture_begin = capture_begin
    try:
        yield log
    finally:
        knobs.runtime.jit_cache_hook = before
        torch.cuda.CUDAGraph.capture_begin = begin


def prompt_sizes(max_num_tokens: int) -> list[int]:
    """1..17 (the GEMV and split-K GEMM ranges, each alignment), then around every power of two and at the
    largest chunk: Triton specializes integer arguments on == 1 and divisibility by 16."""
    sizes = set(range(1, 18))
    p = 32
    while p <= max_num_tokens:
        sizes |= {p - 1, p, p + 1}
        p *= 2
    sizes |= {max_num_tokens - 1, max_num_tokens}
    return sorted(s for s in sizes if 1 <= s <= max_num_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maverick-bench compiles", description=__doc__.split("\n")[0])
    p.add_argument("--tp-size", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-num-tokens", type=int, default=2048)
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--max-draft-len", type=int, default=0,
                   help="with an EAGLE-3 draft at NVIDIA's Maverick head shapes (random weights) verifying this many")
    p.add_argument("--strict", action="store_true", help="exit 1 if serving compiled or captured anything")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: maverick-bench compiles needs a CUDA GPU", file=sys.stderr)
        return 2
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig, QuantConfig
    from maverick.runtime.engine import EngineCore
    from maverick.runtime.model_runner import ModelRunner
    from maverick.runtime.sampling_params import SamplingParams

    cfg = ModelConfig.preset("maverick")
    build = BuildConfig(tp_size=a.tp_size, max_batch_size=a.max_batch_size, max_seq_len=a.max_seq_len,
                        max_num_tokens=a.max_num_tokens, quant=QuantConfig("FP8", "FP8"), kv_cache_block_size=64)
    print(f"card={torch.cuda.get_device_name()} gpus=1 mode=one-rank tp_size={a.tp_size} "
          f"max_batch_size={a.max_batch_size} max_num_tokens={a.max_num_tokens} max_draft_len={a.max_draft_len} "
          f"commit={git_commit()} "
          f"command={' '.join(sys.argv)}", flush=True)
    device = torch.device("cuda")
    model = synthetic_model(cfg, build, 0, device)
    torch.cuda.synchronize()
    with watch() as at_load:
        t0 = time.perf_counter()
        g, loc = build.kv_pool_blocks(cfg)
        runner = ModelRunner(model, max_seq_len=build.max_seq_len, max_batch_size=build.max_batch_size,
                             block_size=64, device=device, num_global_blocks=g, num_local_blocks=loc)
        if a.max_draft_len:
            from maverick.bench.spec import maverick_draft_config, synthetic_draft

            dcfg = maverick_draft_config(cfg, 16384)
            runner.attach_draft(synthetic_draft(dcfg, device, a.tp_size), a.max_draft_len)
        runner.warmup(build.max_num_tokens)
        runner.capture_cuda_graphs(build.graph_batch_sizes(),
                                   build.graph_prefill_tokens())
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
    print(f"load (warm-up and graphs, weights excluded): {load_s:.1f} s, {len(at_load.compiles)} Triton "
          f"specializations, {at_load.captures} graph captures", flush=True)
    engine = EngineCore(runner, None, max_batch_size=build.max_batch_size, max_num_tokens=build.max_num_tokens)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=4 + 2 * a.max_draft_len, temperature=0.0, ignore_eos=True)

    def serve(prompts: list[int]) -> float:
        t = time.perf_counter()
        for n in prompts:
            engine.add_request(torch.randint(4, cfg.vocab_size, (n,), generator=gen).tolist(), params)
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t

    pick = torch.Generator().manual_seed(1)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=pick))

    with watch() as serving:
        first = serve([128])
        sizes = prompt_sizes(build.max_num_tokens)
        for n in sizes:
            serve([n])
        for b in range(1, build.max_batch_size + 1):
            serve([16] * b)
        # and shapes no list above chose: random prompt sizes, batches of random prompts
        for _ in range(16):
            serve([draw(1, build.max_num_tokens)])
        for _ in range(16):
            b = draw(2, build.max_batch_size)
            serve([draw(1, max(1, build.max_num_tokens // b)) for _ in range(b)])
    print(f"first request after load (128-token prompt, {params.max_tokens} tokens): {first * 1e3:.1f} ms")
    print(f"serving: prompts of {len(sizes)} sizes ({sizes[0]}..{sizes[-1]}), batches 1..{build.max_batch_size} of "
          f"16-token prompts, 16 random prompts, 16 random batches: {len(serving.compiles)} Triton "
          f"specializations, {serving.captures} graph captures")
    for line, full in zip(new_specializations(at_load.compiles, serving.compiles), serving.compiles):
        print(f"  compiled while serving: {line}\n    {full}")
    return 1 if a.strict and (serving.compiles or serving.captures) else 0


def describe(name: str, params: list[str], compile: dict) -> str:
    """One specialization as "kernel[options](param: (type, value or attributes), ...)", from the compile
    arguments Triton's jit_cache_hook receives. Its own `repr` is not used: Triton 3.7 builds its argument
    list from one character of the cache key, so two different specializations can read the same."""
    constants, attrs = compile["constants"], compile["configs"][0]
    args = []
    for i, q in enumerate(params):
        if (i,) in constants:
            args.append(f"{q}: (constexpr, {constants[(i,)]})")
        else:
            flags = ", ".join(f"{k}={v}" for k, v in attrs.get((i,), []))
            args.append(f"{q}: ({compile['signature'][q]}, {flags or '-'})")
    # the launch options as the cache key holds them (str(specialization) + str(options)): every option a
    # launch passed (num_warps, num_stages, launch_pdl, ...), not only those the compile arguments name
    key = str(compile.get("key", ""))
    try:
        launch = ast.literal_eval(key[key.rindex("]{") + 1:])
    except (ValueError, SyntaxError):
        launch = {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas") if k in compile}
    options = ", ".join(f"{k}={v}" for k, v in sorted(launch.items()))
    return f"{name}[{options}]({', '.join(args)})"


_ARG = re.compile(r"(\w+): (\([^)]*\))")
_OPTION = re.compile(r"(\w+)=([^,\]]+)")  # launch options in Triton's string: num_warps=4, num_stages=3, ...


def _args(r: str) -> dict[str, str]:
    """A specialization string's arguments and launch options (the options keyed "[name]")."""
    options = r[r.index("[") + 1:r.index("]")] if "[" in r else ""
    return {**{f"[{k}]": v for k, v in _OPTION.findall(options)}, **dict(_ARG.findall(r))}


def new_specializations(before: list[str], after: list[str]) -> list[str]:
    """Each specialization in `after` as its kernel's name and the arguments (scalar specializations and
    constexpr values) that no specialization of that kernel in `before` had: what the warm-up missed. Where
    every value was seen but not together, the arguments that differ from the closest earlier one."""
    seen: dict[str, list[dict[str, str]]] = {}
    for r in before:
        seen.setdefault(r.split("[")[0], []).append(_args(r))
    out = []
    for r in after:
        name, args = r.split("[")[0], _args(r)
        known = seen.get(name, [])
        new = [f"{a}={v}" for a, v in args.items() if all(k.get(a) != v for k in known) and (known or a[0] != "[")]
        if not new and known:
            closest = min(known, key=lambda k: sum(k.get(a) != v for a, v in args.items()))
            new = [f"{a}={v} (was {closest.get(a)})" for a, v in args.items() if closest.get(a) != v]
            out.append(f"{name}: a new combination: "
                       + (", ".join(new) or "(arguments and options as shown all seen together: an option Triton's "
                                             "string omits differs)"))
            continue
        out.append(f"{name}: {', '.join(new) or '(the same as before)'}")
    return out

if __name__ == "__main__":
    sys.exit(main())
