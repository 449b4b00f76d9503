"""The ClickHouse writer: Kafka topics -> batched, idempotent, columnar inserts -> committed offsets.

Commit order (as in quixstreams): insert every table of the batch, then commit the Kafka
offsets of exactly the messages in it. A crash between the two replays the batch:

- the same message range gives the same `insert_deduplication_token` (a hash of the
  topic/partition/offset ranges and the table), so ClickHouse drops a retried block;
- where a replay forms a different batch, the tables are ReplacingMergeTree keyed by
  conversion/receipt/click id, so `FINAL` (and every view) still shows one row.

When ClickHouse is down the writer pauses its partitions (memory stays bounded by one
batch), retries with exponential backoff, reports `postback_sink_clickhouse_up 0`, and
resumes by itself. Nothing is committed that is not in ClickHouse.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge

from postback.config import SinkOptions
from postback.topics import Topics
from schemas.codec import CodecError, decode_any
from sinks.rows import COLUMNS, ROWS_BY_SCHEMA

log = logging.getLogger("sinks.clickhouse")

INSERT_ORDER = ("fx_rates", "clicks", "conversions", "rejections", "duplicates", "outbound_deliveries",
                "postback_outcomes")


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("postback_sink_clickhouse_up", "1 when the last insert succeeded", registry=registry)
        self.up.set(1)
        self.rows = Counter("postback_sink_rows", "Rows inserted, by table", ["table"], registry=registry)
        self.batches = Counter("postback_sink_batches", "Batches inserted and committed", registry=registry)
        self.errors = Counter("postback_sink_insert_errors", "Failed insert attempts", registry=registry)
        self.bad_records = Counter("postback_sink_bad_records", "Undecodable records skipped", registry=registry)
        self.paused = Gauge("postback_sink_paused", "1 while consumption is paused (ClickHouse down)",
                            registry=registry)
        self.batch_rows = Gauge("postback_sink_batch_rows", "Rows in the open batch", registry=registry)


@dataclass
class Batch:
    rows: dict[str, list[tuple]] = field(default_factory=dict)
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    messages: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, topic: str, partition: int, offset: int, rows: dict[str, tuple]) -> None:
        if not self.messages:
            self.started = time.monotonic()
        for table, row in rows.items():
            self.rows.setdefault(table, []).append(row)
        span = self.ranges.get((topic, partition))
        if span is None:
            self.ranges[(topic, partition)] = [offset, offset]
        else:
            span[1] = offset
        self.messages += 1

    def token(self, table: str) -> str:
        """Deterministic for the same message range: a retried batch carries the same token."""
        spans = ";".join(f"{t}:{p}:{a}-{b}" for (t, p), (a, b) in sorted(self.ranges.items()))
        return hashlib.sha256(f"{table}|{spans}".encode()).hexdigest()

    def offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, b + 1) for (t, p), (_a, b) in self.ranges.items()]


class ClickHouseWriter:
    """One consumer, one ClickHouse client (clients are session-bound: not shared across threads)."""

    def __init__(self, bootstrap: str, topics: Topics, client_factory: Callable[[], Any], opts: SinkOptions,
                 metrics: SinkMetrics, group_id: str | None = None) -> None:
        self.topics = topics
        self.opts = opts
        self.metrics = metrics
        self.client_factory = client_factory
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": group_id or topics.sink_clickhouse_group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest",
            "session.timeout.ms": int(opts.session_timeout_s * 1000), "isolation.level": "read_committed",
        })
        self.batch = Batch()
        self.down = False
        self._client: Any = None

    def run(self, stop: threading.Event) -> None:
        names = [self.topics.conversions.name, self.topics.clicks.name, self.topics.rejections.name,
                 self.topics.duplicates.name, self.topics.fx_rates.name, self.topics.outbound_deliveries.name]
        self.consumer.subscribe(names, on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("clickhouse writer consuming %s", ", ".join(names))
        try:
            while not stop.is_set():
                room = max(1, self.opts.max_rows - self.batch.messages)
                for msg in self.consumer.consume(min(room, 5000), timeout=0.1):
                    self._take(msg)
                self.metrics.batch_rows.set(self.batch.messages)
                if self.batch.messages and (self.batch.messages >= self.opts.max_rows or
                                            time.monotonic() - self.batch.started >= self.opts.max_age_s):
                    self.flush(stop)
            self.flush(stop, final=True)
        finally:
            self.consumer.close()

    def _take(self, msg: Any) -> None:
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", msg.error())
            return
        try:
            name, record = decode_any(msg.value())
        except CodecError as exc:
            # Committed past like any other message: one bad record must not stop the table.
            self.metrics.bad_records.inc()
            log.error("skipping undecodable record %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), exc)
            self.batch.add(msg.topic(), msg.partition(), msg.offset(), {})
            return
        self.batch.add(msg.topic(), msg.partition(), msg.offset(), ROWS_BY_SCHEMA[name](record))

    def _client_or_new(self) -> Any:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    def _insert(self) -> None:
        """Detail tables first, `postback_outcomes` last: an outcome row implies its detail row exists."""
        client = self._client_or_new()
        for table in INSERT_ORDER:
            rows = self.batch.rows.get(table)
            if not rows:
                continue
            columns = [list(col) for col in zip(*rows)]
            client.insert(table, columns, column_names=COLUMNS[table], column_oriented=True,
                          settings={"insert_deduplication_token": self.batch.token(table)})

    def flush(self, stop: threading.Event, final: bool = False) -> bool:
        """Insert the batch (retrying with backoff while ClickHouse is down), then commit. True when done."""
        if not self.batch.messages:
            return True
        delay = self.opts.retry_initial_s
        while True:
            try:
                self._insert()
                break
            except Exception as exc:  # noqa: BLE001 - any insert failure: back off and retry
                self._client = None
                self.metrics.errors.inc()
                self.metrics.up.set(0)
                if not self.down:
                    self.down = True
                    self._pause(True)
                    log.error("ClickHouse insert failed, pausing consumption and retrying: %s", exc)
                if stop.is_set() and final:
                    log.error("stopping with %d messages uncommitted (they will be consumed again)",
                              self.batch.messages)
                    return False
                stop.wait(delay)
                for msg in self.consumer.consume(1, timeout=0):  # keeps the membership alive while paused
                    self._take(msg)  # (paused partitions return nothing; never drop what does come)
                delay = min(delay * 2, self.opts.retry_max_s)
                if not self.batch.messages:  # a rebalance took the partitions (and the batch) away
                    return True
        if self.opts.crash_after_insert:
            log.error("fault injection: exiting after the insert, before the commit")
            os._exit(86)
        for table, rows in self.batch.rows.items():
            self.metrics.rows.labels(table).inc(len(rows))
        self._commit(stop)
        self.metrics.batches.inc()
        if self.down:
            self.down = False
            self.metrics.up.set(1)
            self._pause(False)
            log.info("ClickHouse is back: inserted and resumed")
        self.batch = Batch()
        return True

    def _commit(self, stop: threading.Event) -> None:
        """Commit the batch's offsets, riding out a broker restart or a group rebalance.

        The rows are already in ClickHouse, so giving up is safe: whoever consumes these
        offsets again re-inserts the same rows, which the dedup token and ReplacingMergeTree
        collapse. What must not happen is this thread dying on a transient coordinator error.
        """
        delay = self.opts.retry_initial_s
        for attempt in range(8):
            try:
                self.consumer.commit(offsets=self.batch.offsets(), asynchronous=False)
                return
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                code = error.code() if isinstance(error, KafkaError) else None
                if code in (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
                            KafkaError.REBALANCE_IN_PROGRESS, KafkaError._ASSIGNMENT_LOST):
                    log.warning("offsets not committed (%s): the partitions moved; their next owner re-reads "
                                "rows that are already inserted, and they collapse", error)
                    return
                log.warning("offset commit failed (%s), attempt %d; retrying", error, attempt + 1)
                self.metrics.errors.inc()
                if stop.wait(delay):
                    break
                delay = min(delay * 2, self.opts.retry_max_s)
        log.error("offsets not committed after retries; the batch will be re-read and collapse on insert")

    def _pause(self, pause: bool) -> None:
        assignment = self.consumer.assignment()
        if assignment:
            (self.consumer.pause if pause else self.consumer.resume)(assignment)
        self.metrics.paused.set(1 if pause else 0)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.down and partitions:
            consumer.pause(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Flush what we hold for the partitions we lose; if ClickHouse is down, drop it:
        # it was not committed, so the next owner consumes it again.
        try:
            if self.batch.messages and not self.down:
                self._insert()
                consumer.commit(offsets=self.batch.offsets(), asynchronous=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not flush on rebalance (%s); the new owner will re-read", exc)
        self.batch = Batch()
