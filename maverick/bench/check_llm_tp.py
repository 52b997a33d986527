#!/usr/bin/env python3
"""The LLM API at TP=N on N GPUs against TP=1, tiny engine (built here from a random tiny checkpoint):
greedy and sampled tokens with CUDA graphs (decode, prefill, a prompt chunk beside decode rows as two
replays), the overlap scheduler on and off. With
MAVERICK_HANG_DUMP_S=N every rank (this process and the spawned ones) prints its Python stacks
every N seconds, so a hang names its place. Run: `maverick-check llm-tp --tp 2`.
"""
import argparse
import faulthandler
import sys
import tempfile
import time
from pathlib import Path


import torch

from maverick import LLM, SamplingParams, distributed, envs
from maverick.builder.builder import build_engine
from maverick.config import BuildConfig
from maverick.tiny_checkpoint import make_tiny_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--graphs", choices=["on", "off"], default="on")
    p.add_argument("--device", default="cuda", help="cpu: a dry run over gloo (no graphs)")
    a = p.parse_args(argv)
    if envs.hang_dump_s() > 0:
        faulthandler.dump_traceback_later(envs.hang_dump_s(), repeat=True)
    root = Path(tempfile.mkdtemp())
    ckpt = make_tiny_checkpoint(root / "ckpt", dtype="float32")
    engines = {tp: root / f"tp{tp}" for tp in (1, a.tp)}
    for tp, out in engines.items():
        build_engine(ckpt, out, BuildConfig(dtype="float32", max_seq_len=256, max_batch_size=4, max_num_tokens=64,
                                            kv_cache_block_size=8, tp_size=tp), progress=False)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 500, (n,), generator=g).tolist() for n in (40, 11, 23)]
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_k=50, seed=s, ignore_eos=True) for s in (1, 2)]
    params.append(SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    long_prompt = torch.randint(4, 500, (100,), generator=g).tolist()
    outs = {}
    # overlap first: with MAVERICK_FUSED_ALLREDUCE=1 only the first TP>1 LLM of a process gets the fused
    # all-reduce (torch numbers peer-memory rendezvous per process; the next falls back to NCCL, as printed)
    for tp, off in ((1, False), (a.tp, False), (a.tp, True)):
        t0 = time.time()
        with LLM(engines[tp], device=a.device, cuda_graphs=a.graphs == "on", disable_overlap_scheduler=off) as llm:
            outs[tp, off] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
            # alone, a 100-token prompt's chunks (64 + 36) replay the 64-token prefill graph (NCCL inside)
            outs[tp, off] += [o.outputs[0].token_ids for o in llm.generate([long_prompt], params[2])]
            fused = distributed.peer_workspace() is not None
            print(f"tp={tp} overlap={not off} fused all-reduce={fused}: generated in {time.time() - t0:.1f} s, "
                  f"{llm.engine.overlapped} overlapped steps", flush=True)
    same = outs[a.tp, True] == outs[a.tp, False]
    greedy_tp1 = outs[1, False][2:] == outs[a.tp, False][2:]
    print(f"LLM TP CHECK {'PASSED' if same and greedy_tp1 else 'FAILED'}: tp={a.tp} overlap == synchronous: {same}; "
          f"greedy == TP1: {greedy_tp1}; card={torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}", flush=True)
    return 0 if same and greedy_tp1 else 1


if __name__ == "__main__":
    sys.exit(main())
