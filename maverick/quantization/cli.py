"""quantize.py / maverick-quantize: Hugging Face Llama 4 -> FP8 with NVIDIA ModelOpt (calibrated)."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantize.py", description=__doc__)
    # each option also under TensorRT-LLM quantize.py's spelling
    p.add_argument("--model", "--model_dir", dest="model", required=True, help="Hugging Face Llama 4 checkpoint directory")
    p.add_argument("--output", "--output_dir", dest="output", required=True,
                   help="directory for the ModelOpt FP8 checkpoint")
    p.add_argument("--qformat", choices=["fp8"], default="fp8", help="weights and activations: FP8 (the only one)")
    p.add_argument("--kv-cache-dtype", "--kv_cache_dtype", dest="kv_cache_dtype", choices=["fp8", "auto"],
                   default="auto", help="fp8: calibrate an FP8 KV cache")
    p.add_argument("--calib-data", help="text file, one calibration sample per line, or .jsonl of {\"text\": ...}")
    p.add_argument("--calib-size", "--calib_size", dest="calib_size", type=int, default=32)
    p.add_argument("--tp-size", "--tp_size", dest="tp_size", type=int,
                   help="recorded with the checkpoint: build_engine.py uses it when given no tp_size")
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from pathlib import Path

    model = Path(a.model)
    if not model.is_dir():
        print(f"error: --model {model}: {'is a file, not' if model.exists() else 'no such'} checkpoint directory",
              file=sys.stderr)
        return 2
    from maverick.builder.engine_format import is_engine_dir

    if is_engine_dir(model):
        print(f"error: --model {model}: is a maverick engine, not a Hugging Face checkpoint (quantize the "
              "checkpoint the engine was built from)", file=sys.stderr)
        return 2
    if a.tp_size is not None and a.tp_size < 1:
        print(f"error: --tp_size={a.tp_size}: expected >= 1", file=sys.stderr)
        return 2
    from .modelopt_fp8 import quantize_checkpoint

    try:
        summary = quantize_checkpoint(a.model, a.output, a.kv_cache_dtype == "fp8", a.calib_data, a.calib_size,
                                      a.calib_seq_len, a.device, progress=not a.no_progress)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.tp_size is not None:
        import json

        (Path(a.output) / "maverick_build.json").write_text(json.dumps({"tp_size": a.tp_size}))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
