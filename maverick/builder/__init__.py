"""Engine builder: map -> fuse -> quantize/requantize -> shard -> write; memory planner; manifest."""
