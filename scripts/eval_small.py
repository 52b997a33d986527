"""Test perplexity of the bundled model: transformers (fp32, bf16) against engines built from it (fp32, bf16,
ModelOpt FP8 with and without an FP8 KV cache), on the held-out plays, one table.

    python scripts/eval_small.py --device cpu --quantize      # CPU: makes the FP8 checkpoints with ModelOpt too
    python3 scripts/eval_small.py --device cuda              # GPU (no ModelOpt there): carry out/eval-small/ckpt-*

Every engine is scored on the same windows through maverick.evaluate, with top-1 agreement against
transformers in fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "maverick" / "data" / "shakespeare"


def quantize(out: Path, kv: bool) -> None:
    from maverick.quantization.modelopt_fp8 import quantize_checkpoint

    print(quantize_checkpoint(MODEL, out, kv, MODEL / "calib.jsonl", 64, 512, "cpu", progress=False))


def run_one(i: int, name: str, ckpt: Path, dtype: str, ids: list[int], a) -> list[tuple]:
    from maverick.builder.builder import build_engine
    from maverick.config import BuildConfig
    from maverick.evaluate import evaluate

    rows = []
    eng = a.work / f"engine-{a.device}-{i}"
    build_engine(ckpt, eng, BuildConfig(dtype=dtype, max_seq_len=513, max_batch_size=8, max_num_tokens=4096,
                                        kv_cache_block_size=16), progress=False, overwrite=True)
    t0 = time.time()
    res = evaluate(eng, ids, window=512, batch=8, device=a.device, hf=MODEL, hf_dtype="float32", progress=False)
    e, h = res["engine"], res["hf"]
    if i == 0:
        rows.append(("transformers fp32", h.tokens, h.nll, h.ppl, None))
    if i == 1:  # transformers in bf16 on the same windows (the engine pass again, for its reference)
        h = evaluate(eng, ids, window=512, batch=8, device=a.device, hf=MODEL, hf_dtype="bfloat16",
                     progress=False)["hf"]
        rows.append(("transformers bf16", h.tokens, h.nll, h.ppl, None))
    rows.append((name, e.tokens, e.nll, e.ppl, e.top1_agreement))
    print(f"{name}: {e} ({time.time() - t0:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--work", type=Path, default=ROOT / "out" / "eval-small")
    p.add_argument("--quantize", action="store_true", help="make the FP8 checkpoints (ModelOpt, CPU)")
    p.add_argument("--max-tokens", type=int, help="score only the first N test tokens")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from maverick.evaluate import SPLITS

    a.work.mkdir(parents=True, exist_ok=True)
    fp8, fp8_kv = a.work / "ckpt-fp8", a.work / "ckpt-fp8-kv"
    if a.quantize:
        quantize(fp8, False)
        quantize(fp8_kv, True)
    ids = AutoTokenizer.from_pretrained(MODEL).encode(SPLITS["test"].read_text(), add_special_tokens=False)
    ids = ids[: a.max_tokens]
    runs = [("engine fp32", MODEL, "float32"), ("engine bf16", MODEL, "bfloat16"),
            ("engine FP8", fp8, "bfloat16"), ("engine FP8 + FP8 KV", fp8_kv, "bfloat16")]
    rows = []
    for i, (name, ckpt, dtype) in enumerate(runs):
        try:
            rows += run_one(i, name, ckpt, dtype, ids, a)
        except Exception as e:  # one row that cannot run must not cost the others
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
    base = {r[0]: r[3] for r in rows}
    base.setdefault("engine bf16", rows[0][3] if rows else float("nan"))
    print(f"\ntest perplexity, {rows[0][1]} tokens, device {a.device}"
          f" ({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'})")
    print(f"{'':22s} {'NLL':>9s} {'ppl':>9s} {'vs bf16':>8s} {'top-1 vs fp32 HF':>17s}")
    for name, n, nll, ppl, agree in rows:
        rel = 100 * (ppl / base["engine bf16"] - 1)
        print(f"{name:22s} {nll:9.5f} {ppl:9.4f} {rel:+7.3f}% {'' if agree is None else f'{100 * agree:.2f}%':>17s}")
    if a.json:
        a.json.write_text(json.dumps([dict(zip(("run", "tokens", "nll", "ppl", "top1_vs_hf_fp32"), r)) for r in rows],
                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
