#!/usr/bin/env python3
"""FP8 with NVIDIA ModelOpt: `python quantize.py --model CKPT --output CKPT-FP8 [--kv-cache-dtype fp8]`.

See `python quantize.py --help`; the work happens in maverick.quantization.
"""
import sys

from maverick.quantization.cli import main

if __name__ == "__main__":
    sys.exit(main())
