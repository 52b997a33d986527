#!/usr/bin/env python3
"""Write the bundled tiny random Llama 4 checkpoint (HF format, offline tokenizer)."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maverick.tiny_checkpoint import make_tiny_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", default="tiny/checkpoint", help="directory to write (default: tiny/checkpoint)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multimodal", action="store_true", help="Llama4ForConditionalGeneration layout")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--override", default="{}", help='JSON text-config overrides, e.g. \'{"use_qk_norm": true}\'')
    a = p.parse_args()
    out = make_tiny_checkpoint(a.output, seed=a.seed, multimodal=a.multimodal, dtype=a.dtype,
                               **json.loads(a.override))
    print(f"tiny Llama 4 checkpoint written to {out}")


if __name__ == "__main__":
    main()
