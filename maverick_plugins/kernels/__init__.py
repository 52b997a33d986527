"""Triton kernels behind the ops of maverick_plugins (GPU; the Triton interpreter runs them on CPU)."""
