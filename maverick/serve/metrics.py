"""The server's metrics, in Prometheus' exposition format (prometheus_client): counters, latency histograms
and gauges read at scrape time. One registry per server, so tests and several apps in one process stay apart."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

# seconds: from a decode step (about 2 ms on a GPU) to a long prompt's prefill queued behind others
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("maverick_requests", "Requests accepted by the engine", registry=r)
        self.rejected = Counter("maverick_requests_rejected", "Requests refused with 429 (queue full)", registry=r)
        self.aborted = Counter("maverick_requests_aborted", "Requests ended early (client gone, shutdown)", registry=r)
        self.failed = Counter("maverick_requests_failed", "Requests ended by an engine error", registry=r)
        self.prompt_tokens = Counter("maverick_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("maverick_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("maverick_time_to_first_token_seconds", "From submission to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("maverick_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("maverick_queue_time_seconds", "From submission to the first step that runs it",
                                    buckets=LATENCY_BUCKETS, registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends

    def gauges(self, readings: dict[str, tuple[str, Callable[[], float]]]) -> None:
        """Gauges read when scraped: name -> (help, function)."""
        for name, (doc, fn) in readings.items():
            Gauge(name, doc, registry=self.registry).set_function(fn)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
