"""The collectives layers and models call in forward (re-exported so models depend on layers only)."""
import torch

import maverick_plugins as ops

from maverick.distributed import all_gather, all_reduce, peer_workspace

from .norm import add_rms_norm

__all__ = ["all_gather", "all_reduce", "all_reduce_add_rms_norm"]


def all_reduce_add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                            site: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + all_reduce(delta): one fused one-shot kernel over peer buffers when
    they are mapped and the call is small (decode), else the all-reduce and the fused add+norm.
    site: this call's place in the step (2 per layer); each site owns its peer buffer."""
    ws = peer_workspace()
    if ws is not None and ops.kernels_enabled() and ws.fits(delta, site):
        return ws.allreduce_add_rms_norm(x, delta, weight, eps, site)
    return add_rms_norm(x, all_reduce(delta), weight, eps)
