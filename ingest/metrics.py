"""Prometheus metrics of one ingester process, in a registry of its own (no global state).

With `--workers N` each process serves its own `/metrics`; scrape every worker (or run
one per container) and sum, as usual for pre-fork servers.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Latency buckets in seconds: most requests take a few ms (one broker round trip).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class IngestMetrics:
    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("postback_ingest_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("postback_ingest_request_seconds", "Request latency by route",
                                 ["route"], buckets=BUCKETS, registry=self.registry)
        self.records = Counter("postback_ingest_records", "Records acknowledged by Kafka, by topic",
                               ["topic"], registry=self.registry)
        self.kafka_errors = Counter("postback_ingest_kafka_delivery_errors",
                                    "Records Kafka did not acknowledge, by reason", ["reason"],
                                    registry=self.registry)
        self.queue_depth = Gauge("postback_ingest_producer_queue_depth",
                                 "Records in the producer queue awaiting acknowledgement", registry=self.registry)
        self.queue_depth.set_function(queue_depth)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
