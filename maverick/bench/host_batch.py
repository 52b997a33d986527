#!/usr/bin/env python3
"""Host time of turning one step into a ForwardBatch (maverick/runtime/batch.py), no GPU needed: a prompt
chunk as a prefill graph pads it, decode batches as their graphs pad them (max_seq_len 128K table), and a
speculative round's inputs as its round graph stages them (RoundGraphs: built and written to the staging
buffer; the tiny model stands in, only the tables' sizes matter).
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
    for k in (1, 3):
        for b in (1, 8):
            print(f"speculative round inputs, K={k}, batch {b}: {round_inputs_ms(k, b, 100):.3f} ms")
    return 0


def round_inputs_ms(k: int, rows: int, reps: int) -> float:
    """Host ms to build and stage a steady round's inputs (K draft tokens a row, 1K context, 128K tables)."""
    import dataclasses
    import types

    import torch

    from maverick.bench.spec import maverick_draft_config, synthetic_draft
    from maverick.builder.synthetic import synthetic_model
    from maverick.config import BuildConfig, ModelConfig
    from maverick.runtime.cuda_graph import RoundGraphs
    from maverick.runtime.model_runner import ModelRunner

    cfg = ModelConfig.preset("tiny")
    cfg = dataclasses.replace(cfg, attention_chunk_size=8192)
    build = BuildConfig(dtype="float32", max_seq_len=131072, max_batch_size=rows, kv_cache_block_size=64)
    runner = ModelRunner(synthetic_model(cfg, build, 0, "cpu"), 131072, rows, 64, num_global_blocks=rows * 20,
                         num_local_blocks=rows * 20)
    runner.attach_draft(synthetic_draft(maverick_draft_config(cfg, 64), torch.device("cpu")), k)
    runner.graphs = types.SimpleNamespace(logits_rows=lambda shape: shape[0] * shape[1])  # a verify graph's rows
    rounds = RoundGraphs(runner, runner.spec)
    staged, _ = rounds._prepare(rows)
    seqs = [StepSeq(i, [5] * (k + 1), 1024, runner.kv.grow(i, 1024 + k + 1), num_logits=k + 1, draft_len=k,
                    draft_start=1024 - k, draft_tokens=[5] * (k + 1)) for i in range(rows)]
    rounds.stage(staged, seqs, rows)
    t = time.perf_counter()
    for _ in range(reps):
        rounds.stage(staged, seqs, rows)
    return (time.perf_counter() - t) / reps * 1e3


if __name__ == "__main__":
    sys.exit(main())
