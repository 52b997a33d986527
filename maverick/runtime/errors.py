"""The runtime's errors beyond a bad request (InvalidRequest lives with SamplingParams)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .request import Request


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or failed to start."""


class StepError(RuntimeError):
    """A step failed. `requests` were in it and are finished with reason "error" (their KV freed); `fatal`:
    the engine cannot serve any more (EngineCore.failed says why)."""

    def __init__(self, message: str, requests: list[Request], fatal: bool):
        super().__init__(message)
        self.requests, self.fatal = requests, fatal


class EngineDead(RuntimeError):
    """The engine stopped after an unrecoverable error and takes no more requests."""


def is_fatal_error(e: BaseException) -> bool:
    """Errors after which this process cannot run another step: a lost rank, a device error (the CUDA
    context is unusable after an illegal access or a device-side assert). Out-of-memory is not fatal."""
    if isinstance(e, torch.OutOfMemoryError):
        return False
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(e, accel):
        return True
    if isinstance(e, RankFailure) or type(e).__name__ in ("DistBackendError", "DistNetworkError"):
        return True
    return isinstance(e, RuntimeError) and "CUDA error" in str(e)
