"""Executor: requests, scheduler, paged KV cache, batches, model runner, workers, the LLM API."""
