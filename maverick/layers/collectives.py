"""The collectives layers and models call in forward, re-exported from maverick.distributed (which owns them,
the fused all-reduce + add + RMSNorm included) so models depend on layers only."""
from maverick.distributed import all_gather, all_reduce, all_reduce_add_rms_norm

__all__ = ["all_gather", "all_reduce", "all_reduce_add_rms_norm"]
