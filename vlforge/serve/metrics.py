"""Prometheus metrics of one server, in its own registry (several apps in one process stay apart)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("vlforge_queue_depth", "Requests waiting to be admitted", registry=r)
        self.running = Gauge("vlforge_running_sequences", "Sequences in the running decode batch", registry=r)
        self.batch_size = Histogram("vlforge_batch_size", "Rows per model call", ["kind"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.joined_running = Counter("vlforge_sequences_joined_running",
                                      "Sequences that joined a decode batch already running", registry=r)
        self.tokens = Counter("vlforge_generated_tokens", "Tokens generated (rate() gives tokens/s)", registry=r)
        self.requests = Counter("vlforge_requests", "Requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("vlforge_request_latency_seconds", "Time from arrival to the last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("vlforge_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
