"""The collectives layers and models call in forward (re-exported so models depend on layers only)."""
from maverick.distributed import all_gather, all_reduce

__all__ = ["all_gather", "all_reduce"]
