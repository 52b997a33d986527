"""Checkpoint readers: Hugging Face BF16, ModelOpt FP8, Meta FP8. One explicit name table."""
from .errors import CheckpointError
from .reader import CheckpointReader, open_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "open_checkpoint"]
