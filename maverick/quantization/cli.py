"""quantize.py / maverick-quantize: Hugging Face Llama 4 -> FP8 with NVIDIA ModelOpt (calibrated)."""
from __future__ import annotations

import argparse
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantize.py", description=__doc__)
    p.add_argument("--model", required=True, help="Hugging Face Llama 4 checkpoint directory")
    p.add_argument("--output", required=True, help="directory for the ModelOpt FP8 checkpoint")
    p.add_argument("--kv-cache-dtype", choices=["fp8", "auto"], default="auto", help="fp8: calibrate an FP8 KV cache")
    p.add_argument("--calib-data", help="text file, one calibration sample per line (default: bundled text)")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from .modelopt_fp8 import quantize_checkpoint

    try:
        summary = quantize_checkpoint(a.model, a.output, a.kv_cache_dtype == "fp8", a.calib_data, a.calib_size,
                                      a.calib_seq_len, a.device, progress=not a.no_progress)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
