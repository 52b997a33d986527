"""`python -m maverick.bench SUBCOMMAND` (maverick-bench without installing the package)."""
import sys

from maverick.bench.cli import bench_main

sys.exit(bench_main())
