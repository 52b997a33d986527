#!/usr/bin/env python3
"""Build a Maverick engine: `python build_engine.py --checkpoint CKPT --output ENGINE --tp-size N`.

See `python build_engine.py --help`; the work happens in maverick.builder.
"""
import sys

from maverick.builder.cli import main

if __name__ == "__main__":
    sys.exit(main())
