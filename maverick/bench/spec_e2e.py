"""maverick-bench spec-e2e: speculative decoding end to end through the engine loop, on the bundled model.

The small Shakespeare Llama 4 and its trained EAGLE-3 head (maverick/data), held-out prompts (windows of
its test plays), greedy, EOS ignored. The same prompts run through the engine (scheduler, in-flight
batching, CUDA graphs, sampling) without a draft and with it at each K, in one process on one GPU:
tokens/s per user (generated tokens / request time, mean), the acceptance length (tokens per verify
round) and the speedup over plain decoding, each timed on a second pass (the first pass's rate, which pays
for the Triton compilations the load left, is printed apart). Greedy outputs are compared with plain
decoding's: identical in fp32; in bf16 a verify step (k + 1 tokens a row) rounds differently from a
one-token step, so a near tie may flip and the texts part from there (the column counts the requests that
match).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from maverick.bench.timing import git_commit

DATA = Path(__file__).resolve().parent.parent / "data"


def _runner(reader, dtype, device, max_seq_len: int, batch: int, draft=None, k: int = 0):
    from maverick.builder.from_checkpoint import load_model_from_checkpoint
    from maverick.models import ModelSpec
    from maverick.runtime.model_runner import ModelRunner

    model = load_model_from_checkpoint(reader, ModelSpec(dtype=dtype)).to(device)
    runner = ModelRunner(model, max_seq_len=max_seq_len, max_batch_size=batch, block_size=16, device=device)
    if draft is not None:
        runner.attach_draft(draft, k)
    if device.type == "cuda":
        runner.warmup(256)
        runner.capture_cuda_graphs([b for b in (1, 2, 4, 8, 16, 32) if b <= batch], [16, 32, 64, 128, 256])
    return runner


def run(runner, prompts: list[list[int]], new: int, concurrency: int) -> dict:
    """All prompts, `concurrency` at a time (each batch arrives at once); returns figures and the outputs."""
    from maverick.runtime.engine import EngineCore
    from maverick.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    outs, per_user, steps = [], [], 0
    engine = None
    for i in range(0, len(prompts), concurrency):
        engine = EngineCore(runner, None, max_batch_size=concurrency, max_num_tokens=256 * concurrency)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reqs = [engine.add_request(p, params) for p in prompts[i:i + concurrency]]
        done = {}
        while engine.has_unfinished():
            for r in engine.step():
                if r.finished:
                    done[r.request_id] = time.perf_counter() - t0
        per_user += [new / done[r.request_id] for r in reqs]
        outs += [r.output_token_ids for r in reqs]
        steps += engine.steps
        if engine.spec_k:
            stats = engine.spec_stats if i == 0 else _merge(stats, engine.spec_stats)
    out = {"tokens_per_s_per_user": sum(per_user) / len(per_user), "steps": steps, "outputs": outs}
    if engine is not None and engine.spec_k:
        out |= {"acceptance_length": stats.acceptance_length, "rounds": stats.rounds, "proposed": stats.proposed,
                "accepted": stats.accepted}
    return out


def _merge(a, b):
    from maverick.runtime.engine import SpecStats

    return SpecStats(a.rounds + b.rounds, a.proposed + b.proposed, a.accepted + b.accepted)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maverick-bench spec-e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draft-lens", default="1,2,3,4,5")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    from maverick.checkpoint import open_checkpoint
    from maverick.checkpoint.eagle3 import read_eagle3
    from maverick.models.eagle3 import Eagle3Draft

    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    reader = open_checkpoint(DATA / "shakespeare")
    dcfg, weights = read_eagle3(DATA / "shakespeare_eagle3", reader.config, dtype)
    draft = Eagle3Draft(dcfg, dtype)
    draft.load_state_dict(weights)
    draft = draft.to(device)
    tok = AutoTokenizer.from_pretrained(DATA / "shakespeare")
    test = tok((DATA / "shakespeare" / "test.txt").read_text(), add_special_tokens=False)["input_ids"]
    stride = len(test) // a.prompts
    prompts = [test[i * stride:i * stride + a.prompt_len] for i in range(a.prompts)]
    ks = [int(x) for x in a.draft_lens.split(",")]
    conc = [int(x) for x in a.concurrency.split(",")]
    max_seq_len = a.prompt_len + a.new + 16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# spec-e2e on {name}, bundled model ({a.dtype}), {a.prompts} held-out prompts of {a.prompt_len} "
          f"tokens, {a.new} new, greedy; commit {git_commit()}")
    print("| concurrency | K | tok/s/user | speedup | acceptance length | engine steps | same as plain | "
          "first pass tok/s/user |\n|---|---|---|---|---|---|---|---|")
    results = []

    def timed(runner, c):
        """The first pass compiles what the load did not (its rate is reported apart); the second is timed."""
        cold = run(runner, prompts[:c], a.new, c)["tokens_per_s_per_user"]
        return {**run(runner, prompts, a.new, c), "first_pass_tokens_per_s_per_user": cold}

    for c in conc:
        base = timed(_runner(reader, dtype, device, max_seq_len, c), c)
        print(f"| {c} | plain | {base['tokens_per_s_per_user']:.1f} | 1.00 | 1.00 | {base['steps']} | | "
              f"{base['first_pass_tokens_per_s_per_user']:.1f} |", flush=True)
        results.append({"concurrency": c, "k": 0, **{k: v for k, v in base.items() if k != "outputs"}})
        for k in ks:
            r = timed(_runner(reader, dtype, device, max_seq_len, c, draft, k), c)
            same = sum(x == y for x, y in zip(r["outputs"], base["outputs"]))
            if a.dtype == "float32" and same != len(prompts):
                print(f"error: K={k} concurrency {c}: greedy output differs from plain decoding", file=sys.stderr)
                return 1
            speed = r["tokens_per_s_per_user"] / base["tokens_per_s_per_user"]
            print(f"| {c} | {k} | {r['tokens_per_s_per_user']:.1f} | {speed:.2f} | {r['acceptance_length']:.2f} | "
                  f"{r['steps']} | {same}/{len(prompts)} | {r['first_pass_tokens_per_s_per_user']:.1f} |", flush=True)
            results.append({"concurrency": c, "k": k, "speedup": speed, "same_as_plain": same,
                            **{key: v for key, v in r.items() if key != "outputs"}})
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "dtype": a.dtype, "commit": git_commit(),
                                            "prompts": a.prompts, "prompt_len": a.prompt_len, "new": a.new,
                                            "results": results}, indent=1))
    return 0
