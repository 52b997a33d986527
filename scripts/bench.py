#!/usr/bin/env python3
"""Full-size Maverick benchmark on one GPU (one-rank mode); see maverick/benchmark.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maverick.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
