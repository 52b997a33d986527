"""`maverick-bench SUBCOMMAND ...` and `maverick-check SUBCOMMAND ...`: every benchmark and GPU check behind
two commands (also `python -m maverick.bench`). Each subcommand is one module here with its own --help.

Full-size runs need a GPU; the step benchmarks take Maverick's shapes with random FP8 weights.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, what it measures)
BENCH = {
    "step": ("step", "decode steps at batch x context (graph replays) against the roofline, TTFT, e2e, sweeps"),
    "ttft": ("step", "time to first token of given prompt lengths (eager and prefill graph)"),
    "e2e": ("step", "ISL/OSL workloads end to end through the engine loop at each concurrency"),
    "sweep": ("step", "modelled concurrency sweep from measured prefill and decode steps"),
    "peer": ("step", "transformers against maverick on a reduced Maverick (4 layers, 16 experts)"),
    "spec": ("spec", "the EAGLE-3 round (draft extend, chain, verify K+1) and tokens/s per user at given acceptance"),
    "spec-e2e": ("spec_e2e", "speculative decoding end to end on the bundled model and its head: speedup, acceptance"),
    "compiles": ("compiles", "Triton compilations and graph captures left after load, while serving every shape"),
    "kernels": ("kernels", "each min-latency kernel against cuBLAS / torch and a plain read of its bytes"),
    "chain": ("chain", "48 layers of FP8 GEMMs in one graph against the HBM bandwidth"),
    "allreduce": ("allreduce", "all-reduce (+ add + RMSNorm) latency on every GPU of this host (torchrun)"),
    "profile": ("profile", "one decode step under torch.profiler (or ncu): the kernels and their times"),
    "profile-engine": ("profile_engine", "host time of the engine loop's phases at each concurrency"),
    "host-batch": ("host_batch", "host time of building a step's ForwardBatch (no GPU)"),
    "tune": ("tune", "offline tuning of the kernel configs (the dispatch table's entries)"),
}
CHECK = {
    "tp": ("check_tp", "TP layers and the fused all-reduce on real GPUs against one-GPU results (torchrun)"),
    "llm-tp": ("check_llm_tp", "LLM at tp_size = the GPU count: greedy tokens equal TP1's"),
    "peer-shutdown": ("check_peer_shutdown", "a rank stopping mid-run ends the others with an error, not a hang"),
}
# the step benchmark's sections each of its subcommands turns on when not given
_STEP_DEFAULTS = {"ttft": ["--batches", "", "--ttft", "128,1024"], "e2e": ["--batches", "", "--e2e", "128/2048"],
                  "sweep": ["--batches", "", "--sweep", "128/2048"], "peer": ["--batches", "", "--peer-baseline"]}


def _usage(prog: str, table: dict) -> str:
    lines = [f"usage: {prog} [--table FIELD=VALUE ...] SUBCOMMAND [options]   ({prog} SUBCOMMAND --help for its "
             "options; --table sets a threshold of maverick_plugins/dispatch.py's tables for the run)", ""]
    lines += [f"  {name:<15} {what}" for name, (_, what) in table.items()]
    return "\n".join(lines)


def _run(prog: str, table: dict, argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    while len(argv) >= 2 and argv[0] == "--table":  # dispatch-table overrides before the subcommand
        overrides.append(argv[1])
        argv = argv[2:]
    if overrides:
        from maverick_plugins import dispatch

        try:
            values = dispatch.override_tables(overrides)
        except ValueError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 2
        print("dispatch table overrides: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, table))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in table:
        print(f"{prog}: unknown subcommand {name!r}\n\n{_usage(prog, table)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"maverick.bench.{table[name][0]}")
    if table is BENCH and name in _STEP_DEFAULTS:
        rest = _STEP_DEFAULTS[name] + rest  # later flags win
    return module.main(rest) or 0


def bench_main(argv: list[str] | None = None) -> int:
    return _run("maverick-bench", BENCH, argv)


def check_main(argv: list[str] | None = None) -> int:
    return _run("maverick-check", CHECK, argv)
