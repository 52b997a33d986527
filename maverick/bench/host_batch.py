#!/usr/bin/env python3
"""Host time of turning one step into a ForwardBatch (maverick/runtime/batch.py), no GPU needed: a prompt
chunk as a prefill graph pads it, and decode batches as their graphs pad them (max_seq_len 128K table).
Usage: maverick-bench host-batch"""
import platform
import sys
import time


from maverick.bench.timing import git_commit
from maverick.runtime.batch import build_forward_batch
from maverick.runtime.step import StepSeq
from maverick.runtime.kv_cache import SeqBlocks


def per_call_ms(seqs, reps, **pad):
    build_forward_batch(seqs, 64, 8192, 10**6, 10**5, **pad)
    t = time.perf_counter()
    for _ in range(reps):
        build_forward_batch(seqs, 64, 8192, 10**6, 10**5, **pad)
    return (time.perf_counter() - t) / reps * 1e3


def main(argv: list[str] | None = None) -> int:
    print(f"commit={git_commit()} cpu={platform.processor() or platform.machine()} python={platform.python_version()}")
    table = dict(pad_global_blocks=2048, pad_local_blocks=128)
    for n in (128, 2048, 8192):
        seq = StepSeq(1, list(range(n)), 0, SeqBlocks(list(range(n // 64 + 1)), list(range(128))))
        print(f"prompt chunk of {n} tokens: {per_call_ms([seq], 30, pad_batch=1, pad_q=n, pad_tokens=n, **table):.3f} ms")
    for b in (1, 8, 64):
        seqs = [StepSeq(i, [5], 1000, SeqBlocks(list(range(16)), list(range(16)))) for i in range(b)]
        print(f"decode batch {b}: {per_call_ms(seqs, 300, pad_batch=b, pad_q=1, pad_tokens=b, **table):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
