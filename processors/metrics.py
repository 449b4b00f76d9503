"""Prometheus metrics of one processor worker, in a registry of its own (no global state).

Served at `http://127.0.0.1:<web port>/metrics` by the worker's faust web server (one per
worker: `--web-port` + worker index). What an operator needs to see: how many events each
agent handles and in what batch sizes, how many outcomes of each kind leave, how many
table changelog records, and whether publishing to Kafka is failing (retries).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Events per batch: 1 at idle, up to `batch_max` (500) under backlog.
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)


class ProcessorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.events = Counter("postback_processor_events", "Kafka events handled, by agent", ["agent"],
                              registry=self.registry)
        self.batch_events = Histogram("postback_processor_batch_events", "Events per batch, by agent", ["agent"],
                                      buckets=BATCH_BUCKETS, registry=self.registry)
        self.outputs = Counter("postback_processor_outputs",
                               "Stage outputs published, by kind (conversion, rejection, duplicate, and the "
                               "internal dedupe and attribute hops)", ["kind"], registry=self.registry)
        self.changelog_records = Counter("postback_processor_changelog_records",
                                         "Table changelog records published with the batches",
                                         registry=self.registry)
        self.publish_seconds = Histogram("postback_processor_publish_seconds",
                                         "Time from a batch's publish to Kafka's last acknowledgement",
                                         registry=self.registry)
        self.publish_failures = Counter("postback_processor_publish_failures",
                                        "Batch publishes that failed and were retried", registry=self.registry)
        self.skipped = Counter("postback_processor_undecodable_records", "Records skipped as undecodable, by topic",
                               ["topic"], registry=self.registry)
        self.expired = Counter("postback_processor_expired_entries",
                               "Table entries deleted as expired, by table (dedupe: past the advertiser's horizon; "
                               "clicks: past the click horizon)", ["table"], registry=self.registry)
        self.stream_holes = Counter("postback_processor_stream_holes",
                                    "Records missing from a fetched stream partition: read again (reseeked) or, "
                                    "when the log no longer has them, committed over (accepted)", ["outcome"],
                                    registry=self.registry)

    def batch(self, agent: str, events: int, output_kinds: Iterable[str], changelog_records: int) -> None:
        self.events.labels(agent).inc(events)
        self.batch_events.labels(agent).observe(events)
        for kind, count in collections.Counter(output_kinds).items():  # one labelled update per kind, not per output
            self.outputs.labels(kind).inc(count)
        self.changelog_records.inc(changelog_records)

    def render(self) -> bytes:
        return generate_latest(self.registry)
