"""maverick-eval ENGINE --text FILE | --split test: perplexity of an engine over held-out text.

Teacher-forced through the engine's own forward (its kernels, its KV cache, its quantization), in
non-overlapping windows of --window tokens, several windows a step; each window scores its 2nd..last
token. With --hf CHECKPOINT the same windows go through transformers' Llama4ForCausalLM, and the report
adds its perplexity and how often the two models' top-1 tokens agree.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

BUNDLED = Path(__file__).parent / "data" / "shakespeare"
SPLITS = {"test": BUNDLED / "test.txt"}  # the bundled model's held-out plays


@dataclass
class Perplexity:
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood, nats per token
    ppl: float
    top1_agreement: float | None = None  # share of positions where the engine's argmax equals the reference's

    def __str__(self) -> str:
        s = f"{self.tokens} tokens, NLL {self.nll:.5f} nats/token, perplexity {self.ppl:.4f}"
        return s if self.top1_agreement is None else s + f", top-1 agreement {100 * self.top1_agreement:.2f}%"


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Non-overlapping windows of `size` tokens (the last one shorter, dropped below two tokens)."""
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) >= 2]


def score(logits, window: list[int]):
    """(sum of NLL, argmax ids) of window[1:] from fp32 logits of window[:-1] (or of the whole window)."""
    import torch

    logits = logits[: len(window) - 1].float()
    target = torch.tensor(window[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return nll.item(), logits.argmax(-1).cpu()


def engine_logits(llm, batch: list[list[int]]):
    """The engine's fp32 logits at every position of each window (one forward; KV freed after)."""
    from maverick.runtime.step import StepSeq

    runner = llm.engine.runner
    seqs = []
    try:
        for i, w in enumerate(batch):
            seqs.append(StepSeq(-1 - i, w, 0, runner.kv.grow(-1 - i, len(w)), num_logits=len(w)))
        out = runner.forward(seqs)
    finally:
        for s in seqs:
            runner.kv.free(s.seq_id)
    at, per = 0, []
    for w in batch:
        per.append(out[at:at + len(w)])
        at += len(w)
    return per


def evaluate(engine_dir: str | Path, ids: list[int], window: int = 512, batch: int = 4, device: str | None = None,
             hf: str | Path | None = None, hf_dtype: str = "float32", progress: bool = True) -> dict[str, Perplexity]:
    """{"engine": Perplexity, and with hf: "hf": Perplexity} over the same windows of `ids`."""
    import torch
    from tqdm import tqdm

    from maverick import LLM

    results = {}
    with LLM(engine_dir, device=device, cuda_graphs=False) as llm:
        window = min(window, llm.cfg.build.max_seq_len - 1)
        batch = max(1, min(batch, llm.cfg.build.max_batch_size))
        wins = windows(ids, window)
        ref = None
        if hf is not None:
            from transformers import Llama4ForCausalLM

            ref = Llama4ForCausalLM.from_pretrained(hf, dtype=getattr(torch, hf_dtype)).to(llm.device_kind).eval()
        tot = {"engine": 0.0, "hf": 0.0}
        n = agree = 0
        bar = tqdm(total=sum(len(w) - 1 for w in wins), desc="perplexity", unit="tok", disable=not progress)
        with torch.inference_mode():
            for i in range(0, len(wins), batch):
                part = wins[i:i + batch]
                for w, lg in zip(part, engine_logits(llm, part)):
                    nll, top = score(lg, w)
                    tot["engine"] += nll
                    if ref is not None:
                        x = torch.tensor([w], device=llm.device_kind)
                        nll_r, top_r = score(ref(input_ids=x).logits[0], w)
                        tot["hf"] += nll_r
                        agree += int((top == top_r).sum())
                    n += len(w) - 1
                    bar.update(len(w) - 1)
        bar.close()
    results["engine"] = Perplexity(n, tot["engine"] / n, math.exp(tot["engine"] / n),
                                   agree / n if ref is not None else None)
    if ref is not None:
        results["hf"] = Perplexity(n, tot["hf"] / n, math.exp(tot["hf"] / n))
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maverick-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="engine directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="a text file to score")
    src.add_argument("--split", choices=sorted(SPLITS), help="the bundled model's held-out plays")
    p.add_argument("--hf", help="a Hugging Face checkpoint to compare with (transformers, same windows)")
    p.add_argument("--hf-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--window", type=int, default=512, help="tokens per window (at most max_seq_len - 1)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--device", choices=["cuda", "cpu"])
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from transformers import AutoTokenizer

    from maverick.builder.engine_format import EngineError

    path = Path(a.text) if a.text else SPLITS[a.split]
    if not path.is_file():
        print(f"error: --text {path}: no such file", file=sys.stderr)
        return 2
    if a.window < 2 or a.batch < 1:
        print(f"error: --window {a.window} / --batch {a.batch}: expected a window >= 2 and a batch >= 1", file=sys.stderr)
        return 2
    try:
        tok = AutoTokenizer.from_pretrained(a.engine)
    except (OSError, ValueError) as e:
        print(f"error: {a.engine}: no tokenizer to read the text with ({e})", file=sys.stderr)
        return 2
    ids = tok.encode(path.read_text(), add_special_tokens=False)[: a.max_tokens]
    try:
        res = evaluate(a.engine, ids, a.window, a.batch, a.device, a.hf, a.hf_dtype)
    except (EngineError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, r in res.items():
        print(f"{name:7s} {r}")
    if a.json:
        Path(a.json).write_text(json.dumps({k: asdict(v) for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
