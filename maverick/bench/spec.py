"""maverick-bench spec: the EAGLE-3 speculative round at full Maverick shapes, one rank of TP8, one GPU.

A round is one draft extend over the accepted positions (at most K+1 tokens), K-1 one-token draft steps and
one target verify step of K+1 tokens; the engine replays it as one CUDA graph (RoundGraphs), timed as such
(CUDA events, median) and tokens/s per user come from it. Each part is also timed from its own CUDA graph:
the verify step as the engine's verify graph (1, K+1) (every token's logits, the draft's features
written), the draft steps as graphs of the draft network (decoder layer, norm, lm_head, argmax) at NVIDIA's
Maverick draft shapes with random weights, split as the engine splits it (the layer replicated, lm_head
by vocabulary rows; the ranks' argmax exchange is not run). Tokens/s per user = acceptance length / round
time, at the acceptance lengths published for Maverick at K=3 (2.37, 2.94, 3.08) or any given with
--acceptance (measured at --acceptance-k). At another K the length follows the chain model: each draft
token is accepted with one probability a given its predecessors were, L(K) = 1 + a + ... + a^K, with a
fitted to the given length at the measured K (2.94 at K=3: a = 0.80, L(2) = 2.43, L(4) = 3.34).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
from maverick_plugins import dispatch

from maverick.bench.measure import decode_step, hbm_read_bandwidth, kv_blocks
from maverick.bench.timing import git_commit, median_ms
from maverick.builder.synthetic import fill_synthetic, synthetic_model
from maverick.config import DRAFT_LINEARS, BuildConfig, Eagle3Config, ModelConfig, QuantConfig
from maverick.layers.forward_batch import ForwardBatch
from maverick.layers.rotary import rope_inv_freq
from maverick.models.eagle3 import Eagle3Draft
from maverick.runtime.batch import build_forward_batch
from maverick.runtime.kv_cache import SeqBlocks
from maverick.runtime.model_runner import ModelRunner
from maverick.runtime.staging import to_device
from maverick.runtime.step import StepSeq


def maverick_draft_config(cfg: ModelConfig, intermediate: int) -> Eagle3Config:
    """NVIDIA's Maverick EAGLE-3 head: Maverick's attention shapes, the full vocabulary, aux layers 1, 23, 44."""
    return Eagle3Config(hidden_size=cfg.hidden_size, target_hidden_size=cfg.hidden_size, intermediate_size=intermediate,
                        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                        head_dim=cfg.head_dim, vocab_size=cfg.vocab_size, draft_vocab_size=cfg.vocab_size,
                        aux_layer_ids=Eagle3Config.default_aux_layer_ids(cfg.num_hidden_layers),
                        rope_theta=cfg.rope_theta)


def synthetic_draft(dcfg: Eagle3Config, device: torch.device, tp_size: int = 1) -> Eagle3Draft:
    """Random weights at dcfg's shapes (FP8 where dcfg.fp8_linears says); lm_head rank 0's 1/tp_size of the
    vocabulary (the engine's split)."""
    with torch.device("meta"):
        draft = Eagle3Draft(dcfg, torch.bfloat16, tp_size)
    draft = draft.to_empty(device=device)
    fill_synthetic(dict(draft.named_parameters()), torch.Generator(device=device).manual_seed(5))
    draft.d2t.zero_()
    draft.midlayer.inv_freq = rope_inv_freq(dcfg).to(device)  # derived, not a weight: to_empty left it blank
    return draft.eval()


def verify_ms(runner: ModelRunner, draft: Eagle3Draft, k: int, context: int) -> float:
    """The target's verify step over K+1 new tokens of one sequence at `context`, from the engine's (1, K+1)
    verify graph (logits of every token, the draft's fused features written to its cache)."""
    runner.attach_draft(draft, k)
    runner.capture_cuda_graphs([1])
    seq = StepSeq(40_000, list(range(1, k + 2)), context, runner.kv.grow(40_000, context + k + 1), num_logits=k + 1)
    ms = median_ms(runner.stage_graph([seq], (1, k + 1)).replay, iters=30)
    runner.kv.free(40_000)
    runner.graphs = runner.spec = runner.model.feature_sink = None
    return ms


def round_ms(runner: ModelRunner, draft: Eagle3Draft, k: int, context: int) -> float:
    """A steady round as the engine runs it on CUDA: one replay of its (batch 1) round graph (draft extend over
    K+1 positions, K-1 chain steps, the target's verify of K+1 tokens), staged once."""
    runner.attach_draft(draft, k)
    runner.capture_cuda_graphs([1])
    blocks = runner.kv.grow(40_000, context + k + 1)
    seq = StepSeq(40_000, list(range(1, k + 2)), context, blocks, num_logits=k + 1, draft_len=k,
                  draft_start=context - k, draft_tokens=list(range(1, k + 2)))
    rounds = runner.rounds
    assert rounds.fits([seq]) == 1
    run, staged = rounds.graphs[1]
    rounds.stage(staged, [seq], 1)
    ms = median_ms(run, iters=30)
    runner.kv.free(40_000)
    runner.graphs = runner.rounds = runner.spec = runner.model.feature_sink = None
    return ms


def draft_ms(draft: Eagle3Draft, runner: ModelRunner, tokens: int, context: int) -> float:
    """One draft forward over `tokens` new positions after `context`, with lm_head and argmax, from a graph."""
    bs = runner.block_size
    nblocks = -(-(context + tokens) // bs)
    cache = [torch.randn(draft.kv_cache_shape(nblocks, bs), dtype=torch.bfloat16, device=runner.device)
             for _ in range(2)]
    seq = StepSeq(0, list(range(1, tokens + 1)), context, SeqBlocks(list(range(nblocks)), []), num_logits=1)
    batch = ForwardBatch(**to_device(build_forward_batch([seq], bs, runner.chunk, nblocks * bs, 0).tensors(),
                                     runner.device))
    h = torch.randn(tokens, draft.cfg.hidden_size, dtype=torch.bfloat16, device=runner.device)

    def step():
        out = draft(runner.model.embed(batch.input_ids), h, batch, cache)
        return draft.propose(out[batch.logits_indices])

    with torch.inference_mode(), dispatch.use(runner.kernel_options):
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
    return median_ms(g.replay, iters=30)


def chain_rate(length: float, k: int) -> float:
    """The per-token acceptance probability a with 1 + a + ... + a^k = length (bisection: the sum rises in a)."""
    if not 1.0 <= length <= k + 1:
        raise ValueError(f"an acceptance length at K={k} lies in [1, {k + 1}], got {length}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** i for i in range(k + 1)) < length else (lo, mid)
    return (lo + hi) / 2


def acceptance_at(length: float, measured_k: int, k: int) -> float:
    """The acceptance length at draft length k implied by `length` measured at `measured_k` (chain model)."""
    a = chain_rate(length, measured_k)
    return sum(a ** i for i in range(k + 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="maverick-bench spec", description=__doc__.split("\n")[0])
    p.add_argument("--tp-size", type=int, default=8, help="per-rank shapes of this TP size (one rank)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--draft-lens", default="1,2,3,4,5")
    p.add_argument("--acceptance", default="2.37,2.94,3.08",
                   help="acceptance lengths (tokens a round) to turn round times into tokens/s per user")
    p.add_argument("--acceptance-k", type=int, default=3,
                   help="the draft length the acceptance lengths were measured at (other K: the chain model)")
    p.add_argument("--draft-intermediate", type=int, default=16384,
                   help="the draft MLP's width (Maverick's dense intermediate_size_mlp)")
    p.add_argument("--allreduce-us", type=float, default=0.0,
                   help="one all-reduce's latency measured elsewhere: adds 96 to each verify for a TP8 projection")
    p.add_argument("--draft-fp8", default="",
                   help="draft linears stored in FP8, comma-separated from " + ",".join(DRAFT_LINEARS)
                   + ", or 'all' (ModelOpt's export keeps lm_head in bf16; default: none, as NVIDIA's published head)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    fp8 = DRAFT_LINEARS if a.draft_fp8 == "all" else tuple(n for n in a.draft_fp8.split(",") if n)
    accs = [float(x) for x in a.acceptance.split(",")]
    try:  # a length outside [1, K+1] is an error before any GPU work
        for x in accs:
            chain_rate(x, a.acceptance_k)
    except ValueError as e:
        print(f"error: --acceptance: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: maverick-bench spec needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    cfg = ModelConfig.preset("maverick")
    ks = [int(k) for k in a.draft_lens.split(",")]
    build = BuildConfig(tp_size=a.tp_size, max_batch_size=1, max_seq_len=a.context + 64,
                        quant=QuantConfig("FP8", "FP8"), kv_cache_block_size=64)
    print(f"card={torch.cuda.get_device_name()} gpus=1 mode=one-rank tp_size={a.tp_size} context={a.context} "
          f"commit={git_commit()} command={' '.join(sys.argv)}", flush=True)
    bw = hbm_read_bandwidth()
    print(f"HBM read bandwidth: {bw / 1e12:.2f} TB/s", flush=True)
    model = synthetic_model(cfg, build, 0, device)
    g, loc = kv_blocks(cfg, 64, [(1, a.context + 64)])
    runner = ModelRunner(model, max_seq_len=build.max_seq_len, max_batch_size=1, block_size=64, device=device,
                         num_global_blocks=g, num_local_blocks=loc)
    plain = decode_step(runner, cfg, build, 1, a.context, bw, a.tp_size)
    dcfg = dataclasses.replace(maverick_draft_config(cfg, a.draft_intermediate), fp8_linears=fp8)
    draft = synthetic_draft(dcfg, device, a.tp_size)
    dbytes = sum(t.numel() * t.element_size() for t in draft.state_dict().values())
    one = draft_ms(draft, runner, 1, a.context)
    print(f"plain decode step (batch 1): {plain.step_ms:.3f} ms ({plain.tokens_per_s_per_user:.1f} tok/s/user); "
          f"draft step (1 token): {one:.3f} ms for {dbytes / 1e9:.2f} GB of draft weights a rank (layer "
          f"replicated, lm_head 1/{a.tp_size} of the vocabulary; FP8: {', '.join(fp8) or 'none'}; floor {dbytes / bw * 1e3:.3f} ms)", flush=True)
    rows = []
    ar_ms = 96 * a.allreduce_us / 1e3
    print("| K | verify ms | draft extend (K+1 tokens) ms | draft chain ms | sum of parts ms | round graph ms | "
          + " | ".join(f"tok/s/user at {x} (K={a.acceptance_k})" for x in accs) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(accs))
    for k in ks:
        ver = verify_ms(runner, draft, k, a.context) + ar_ms
        ext = draft_ms(draft, runner, k + 1, a.context)
        chain = (k - 1) * one
        rnd = round_ms(runner, draft, k, a.context) + ar_ms  # the engine's one launch a round
        lens = [acceptance_at(x, a.acceptance_k, k) for x in accs]
        tps = [n / rnd * 1e3 for n in lens]
        rows.append({"k": k, "verify_ms": ver, "extend_ms": ext, "chain_ms": chain, "parts_ms": ver + ext + chain,
                     "round_ms": rnd, "acceptance_length": dict(zip(map(str, accs), lens)),
                     "tokens_per_s_per_user": dict(zip(map(str, accs), tps))})
        print(f"| {k} | {ver:.3f} | {ext:.3f} | {chain:.3f} | {ver + ext + chain:.3f} | {rnd:.3f} | "
              + " | ".join(f"{t:.0f} (L={n:.2f})" for t, n in zip(tps, lens)) + " |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "commit": git_commit(), "bandwidth": bw,
                       "plain_step_ms": plain.step_ms, "draft_step_ms": one, "draft_bytes": dbytes,
                       "draft_fp8_linears": list(fp8),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
