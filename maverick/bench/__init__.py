"""Benchmarks and GPU checks: one module a subcommand of `maverick-bench` / `maverick-check` (cli.py), one
timing utility (timing.py), the step measurements (measure.py) and the sweep, peer baseline and plot."""
