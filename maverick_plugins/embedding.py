"""A vocabulary-parallel embedding's rows: each rank holds ids start .. start + rows - 1 and contributes zeros
for the others (the sum over ranks is the embedding)."""
import torch

from . import dispatch


def embedding_rows(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """[T, hidden] rows of this rank's weight [rows, hidden] for ids [T] (zeros for ids it does not hold): one
    Triton kernel on CUDA, else the reference."""
    if ids.dim() != 1 or weight.dim() != 2:
        raise ValueError(f"embedding_rows: expected ids [T] and weight [rows, hidden], got ids {list(ids.shape)} "
                         f"and weight {list(weight.shape)}")
    if dispatch.active(weight):
        from .kernels.step_start import embedding_rows_triton

        return embedding_rows_triton(ids.contiguous(), weight.contiguous(), start)
    return embedding_rows_ref(ids, weight, start)


def embedding_rows_ref(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    local = ids - start
    mine = (local >= 0) & (local < weight.shape[0])
    return weight[local.clamp(0, weight.shape[0] - 1)] * mine[:, None].to(weight.dtype)
