class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config."""
