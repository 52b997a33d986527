"""When an op runs its GPU kernel instead of the reference: one table of measured thresholds.

Kernels run only on CUDA tensors and only in the regime they were built for (a few tokens: the
min-latency path); larger batches keep the reference path (cuBLAS through torch, which wins there).
"""
from __future__ import annotations

import functools

import torch

# Thresholds per device name prefix; "default" applies to any other CUDA device.
THRESHOLDS = {
    "default": {"gemm_max_tokens": 16, "moe_max_tokens": 16, "attention_max_new_tokens": 8,
                "allreduce_max_tokens": 16,
                # one-launch router (GEMV + top-k): H200, e316438: 1 token 5.2 us vs 6.8 for cuBLAS + top-k;
                # 8 tokens 22.4 vs 6.9 (each program walks the tokens one by one), so only for one token
                "router_max_tokens": 1},
}

_enabled = True

# Programmatic dependent launch (Hopper+): each kernel lets its successor launch at once and waits
# for its inputs with griddepcontrol. Measured OFF by default: in one run on H200 (TP8 one-rank step,
# batch 1, 1K context) waiting at kernel entry made the step slower, 3.17-3.20 ms with it against
# 2.87-2.88 ms without. It can only pay once kernels stream their weights before the wait.
# `maverick-bench --pdl` / set_pdl() compare the two. PDL holds 0 (off), 1 (the next kernel may launch
# when this one starts) or 2 (when every program of this one passed its main loop: kernels/pdl.py).
PDL = 0
PDL_LAUNCH: dict = {}
# With PDL: the FP8 GEMMs bulk-prefetch their weight slices into L2 before they wait (weights depend
# on no earlier kernel), so HBM streams the next GEMM's weights while the previous one finishes.
PDL_PREFETCH = False

# Split-K GEMMs: the last split of each column block reduces the partials (an arrival counter per block)
# instead of a second "epilogue" launch (96 launches, 252 us of a 2.9 ms step in the profile of 2998a6a).
# Measured on H200 (one-rank TP8, 2735525): batch 1 at 1K 2.685 -> 2.624 ms/step, at 8K 3.025 -> 2.926;
# bit-exact with the two-launch path (tests/test_gpu.py).
SPLITK_SERIAL = True


def set_pdl(enabled: bool, prefetch: bool = False, trigger: str = "entry") -> None:
    """Must run before the first kernel launch: kernel modules bind the flags when imported. trigger:
    "entry" lets the next kernel launch when this one starts, "late" once its programs passed their main
    loops."""
    global PDL, PDL_LAUNCH, PDL_PREFETCH
    if trigger not in ("entry", "late"):
        raise ValueError(f"PDL trigger {trigger!r}: expected 'entry' or 'late'")
    on = enabled and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    PDL = (1 if trigger == "entry" else 2) if on else 0
    PDL_LAUNCH = {"launch_pdl": True} if PDL else {}
    PDL_PREFETCH = PDL and prefetch


def set_splitk_serial(enabled: bool) -> None:
    """Must run before the first kernel launch, like set_pdl (the GEMM module binds the flag at import)."""
    global SPLITK_SERIAL
    SPLITK_SERIAL = enabled


def set_kernels_enabled(enabled: bool) -> None:
    """Force the reference path everywhere (A/B comparisons, debugging)."""
    global _enabled
    _enabled = enabled


def kernels_enabled() -> bool:
    return _enabled


def threshold(x: torch.Tensor, name: str) -> int:
    if not (_enabled and x.is_cuda):
        return -1
    return _table(x.device.index if x.device.index is not None else torch.cuda.current_device())[name]


@functools.cache
def _table(device_index: int) -> dict:
    """The thresholds of one device, looked up once: ops ask on every eager launch (several per layer)."""
    dev = torch.cuda.get_device_name(device_index)
    for prefix, table in THRESHOLDS.items():
        if prefix != "default" and dev.startswith(prefix):
            return table
    return THRESHOLDS["default"]
