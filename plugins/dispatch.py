"""When an op runs its GPU kernel instead of the reference: one table of measured thresholds.

Kernels run only on CUDA tensors and only in the regime they were built for (a few tokens: the
min-latency path); larger batches keep the reference path (cuBLAS through torch, which wins there).
"""
from __future__ import annotations

import functools

import torch

# Thresholds per device name prefix; "default" applies to any other CUDA device.
THRESHOLDS = {
    # gemv_max_tokens: H200, tune_kernels.py --parts gemv (2e3b51f), one token after another GEMM of its shape
    # with PDL: qkv 5.71 -> 3.02 us, o_proj 3.62 -> 2.27, fc13 + SwiGLU 10.24 -> 8.33, fc2 7.45 -> 3.89; two
    # tokens only where it wins too (fp8_gemv.config_for: qkv 5.76 -> 4.62, fc13 + SwiGLU loses)
    "default": {"gemm_max_tokens": 16, "gemv_max_tokens": 2, "moe_max_tokens": 16, "attention_max_new_tokens": 8,
                "allreduce_max_tokens": 16,
                # one-launch router (GEMV + top-k): H200, e316438: 1 token 5.2 us vs 6.8 for cuBLAS + top-k;
                # 8 tokens 22.4 vs 6.9 (each program walks the tokens one by one), so only for one token
                "router_max_tokens": 1},
}

_enabled = True

# Programmatic dependent launch (Hopper+): a kernel launched with it may start before its predecessor ends;
# it waits for the predecessor's results with griddepcontrol (kernels/pdl.py). Modes: 0 off, 1 the next
# kernel launches when this one starts, 2 once every program of this one passed its main loop.
# Measured (one-rank TP8 step, 1K context, same machine): mode 1 made the step slower (H200, 2735525:
# 3.17-3.20 ms against 2.87-2.88 off; H100, faf2254: 2.572 against 2.416-2.422): the early programs of
# the next kernel wait on SMs that this kernel's later waves need. Mode 2 (H100, faf2254): batch 1
# 2.416, 2.422 -> 2.265, 2.265 ms; batch 8 3.657, 3.647 -> 3.403, 3.391 ms. So mode 2 is the default
# on Hopper and newer; request_pdl() (maverick passes MAVERICK_PDL=off|entry|late) or set_pdl() choose. The
# mode is decided when the first kernel module is imported (kernel modules bind it then), on the device in
# use by then: importing this module creates no CUDA context.
_PDL_MODES = {"off": 0, "entry": 1, "late": 2}
_pdl_request = "late"
_pdl_mode: int | None = None
# With PDL: the FP8 GEMMs bulk-prefetch their weight slices into L2 before they wait (weights depend
# on no earlier kernel), so HBM streams the next GEMM's weights while the previous one finishes.
PDL_PREFETCH = False

# Split-K GEMMs: the last split of each column block reduces the partials (an arrival counter per block)
# instead of a second "epilogue" launch (96 launches, 252 us of a 2.9 ms step in the profile of 2998a6a).
# Measured on H200 (one-rank TP8, 2735525): batch 1 at 1K 2.685 -> 2.624 ms/step, at 8K 3.025 -> 2.926;
# bit-exact with the two-launch path (tests/test_gpu.py).
SPLITK_SERIAL = True


def check_pdl_mode(mode: str, what: str = "PDL mode") -> str:
    """mode if it is one of "off", "entry", "late"; else a ValueError naming `what` and the choices."""
    if mode not in _PDL_MODES:
        raise ValueError(f"{what}={mode!r}: expected one of {sorted(_PDL_MODES)}")
    return mode


def request_pdl(mode: str) -> None:
    """The PDL mode to use once decided ("off", "entry", "late"); touches no GPU."""
    global _pdl_request
    _pdl_request = check_pdl_mode(mode)


def set_pdl(mode: str | None = None, prefetch: bool = False) -> None:
    """Decide the PDL mode now: mode "off", "entry" or "late" (above; None: the requested one). Must run
    before the first kernel launch: kernel modules bind the flags when imported. Off wherever the GPU
    predates Hopper."""
    global _pdl_mode, PDL_PREFETCH
    mode = _pdl_request if mode is None else check_pdl_mode(mode)
    on = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
    _pdl_mode = _PDL_MODES[mode] if on else 0
    PDL_PREFETCH = bool(_pdl_mode) and prefetch


def pdl_mode() -> int:
    """The PDL mode in effect (0, 1, 2), decided on first use (the requested mode, default "late")."""
    if _pdl_mode is None:
        set_pdl()
    return _pdl_mode


def pdl_mode_name() -> str:
    """"off", "entry" or "late": the mode in effect (for reports)."""
    return next(name for name, mode in _PDL_MODES.items() if mode == pdl_mode())


def __getattr__(name: str):
    """PDL and PDL_LAUNCH, which the kernel modules import, exist once decided (pdl_mode)."""
    if name == "PDL":
        return pdl_mode()
    if name == "PDL_LAUNCH":
        return {"launch_pdl": True} if pdl_mode() else {}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


# SMs assumed where there is no CUDA device (the Triton interpreter on CPU): an H100 / H200 SXM's
CPU_SM_COUNT = 132


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (132 on H100/H200 SXM, 148 on B200), looked up once per device."""
    if device.type != "cuda":
        return CPU_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _table(device_index: int) -> dict:
    """The thresholds of one device, looked up once: ops ask on every eager launch (several per layer)."""
    dev = torch.cuda.get_device_name(device_index)
    for prefix, table in THRESHOLDS.items():
        if prefix != "default" and dev.startswith(prefix):
            return table
    return THRESHOLDS["default"]
