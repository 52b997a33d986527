"""Every environment variable the package reads, in one place (never inside layers)."""
from __future__ import annotations

import os


def mpi_world() -> tuple[int, int] | None:
    """(rank, size) when launched under mpirun/mpiexec (Open MPI, MPICH/PMI), else None."""
    for rank_key, size_key in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                               ("PMIX_RANK", "PMIX_SIZE")):
        if rank_key in os.environ and size_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[size_key])
    return None


def log_level() -> str:
    return os.environ.get("MAVERICK_LOG_LEVEL", "WARNING")


def rank_timeout_s() -> float:
    """How long LLM waits for a rank to answer before declaring it dead."""
    return float(os.environ.get("MAVERICK_RANK_TIMEOUT_S", "300"))


def fused_all_reduce() -> bool:
    """The fused one-shot all-reduce + add + RMSNorm over peer buffers at TP > 1 (MAVERICK_FUSED_ALLREDUCE=0:
    NCCL + the add+norm kernel). On by default: real TP4 on 4xH200, batch-1 step 4.631 -> 3.945 ms, batch 8
    equal (benchmarks/TUNING.md). Where peers cannot be mapped it falls back to NCCL with a warning."""
    return os.environ.get("MAVERICK_FUSED_ALLREDUCE", "1") != "0"


def pdl() -> bool:
    """MAVERICK_PDL=on|off: programmatic dependent launch of the kernels on Hopper and newer (default on; the
    measurements are in benchmarks/TUNING.md). "late", the old name of on, is accepted."""
    value = os.environ.get("MAVERICK_PDL", "on").strip().lower()
    if value not in ("on", "late", "1", "off", "0"):
        raise ValueError(f"MAVERICK_PDL={value!r}: expected 'on' or 'off'")
    return value in ("on", "late", "1")


def commit_override() -> str | None:
    """MAVERICK_COMMIT: the commit a benchmark reports when the tree it runs from has no usable .git."""
    return os.environ.get("MAVERICK_COMMIT") or None


def torchrun_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))
    return None


def hang_dump_s() -> float:
    """MAVERICK_HANG_DUMP_S=N: every rank prints all its threads' Python stacks every N seconds (to find
    where a multi-GPU run hangs; off by default)."""
    return float(os.environ.get("MAVERICK_HANG_DUMP_S", "0"))


def persistent() -> bool:
    """MAVERICK_PERSISTENT=1: one-token steps run each decoder layer as its attention kernel and one persistent
    launch for the rest (o_proj, FFN, the next qkv; maverick/layers/persistent_tail.py), on one rank. Off by
    default: measured at twice the layer-by-layer step's time (H100, BENCHMARKS.md); 0 or unset: off."""
    value = os.environ.get("MAVERICK_PERSISTENT", "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"MAVERICK_PERSISTENT={value!r}: expected 0 or 1")
    return value == "1"
