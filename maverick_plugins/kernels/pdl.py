"""Programmatic dependent launch (Hopper and newer), the one helper every kernel uses.

Host side: `pdl_launch(device)` gives the keyword arguments of a launch (the PDL constexpr and Triton's
launch_pdl flag) from the current dispatch.KernelOptions. Device side: a kernel calls `pdl_enter` before
its first read of a predecessor's output (loads of weights, which no kernel writes, go before it) and
`pdl_release` once its main loop is done, which lets the next kernel launch: its programs then wait on
free SM slots instead of a launch, without taking the slots this kernel's later waves still need.
"""
import torch
import triton
import triton.language as tl

from ..dispatch import options


def pdl_launch(device: torch.device) -> dict:
    """Keyword arguments of a kernel launch on `device`: PDL on where the options and the GPU allow it."""
    return {"PDL": True, "launch_pdl": True} if options().pdl_on(device) else {"PDL": False}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL this kernel waits here until its predecessor is done (and its writes are visible)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """With PDL the next kernel may launch once every program of this one got here. Kernels that never
    call it release at exit."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
