"""Pieces of maverick-bench beyond the decode step: the concurrency sweep, the transformers peer
baseline and the Pareto plot (maverick/benchmark.py is the command)."""
