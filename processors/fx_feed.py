"""The FX rates every processor worker keeps: the whole compacted fx-rates topic, in memory.

Why not a faust table: a conversion of any offer, on any partition, may need the rate of
any currency, so every worker needs every rate. The topic is small (one record per
currency and day) and compacted, so each worker reads all of it with its own
confluent-kafka consumer (no consumer group, every partition from the beginning) and
keeps following it, so rates loaded later (`postback fx load`) arrive without a restart.

Guarantee: `start()` returns only once every rate that was in the topic when it was called
has been read (bounded by `timeout_s`; a timeout is an error naming the topic). So a
worker never computes a conversion's reporting amounts against a partial rate set at
start-up. A rate that arrives later applies to conversions processed after it; ones
processed before it carry `fx_missing` (see `postback fx backfill` in docs/analytics.md).
"""

from __future__ import annotations

import logging
import threading
import time
from decimal import Decimal, InvalidOperation

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from postback.fx import FxRate, FxRates
from schemas.codec import Codec, CodecError

log = logging.getLogger("processors")

POLL_S = 0.5


class FxFeed:
    """Follows one fx-rates topic into an `FxRates` (read by the commission stage on the event loop).

    `FxRates.add` only ever inserts into dicts, so the reader thread and the event loop
    share it without a lock: a lookup sees a rate either before or after it was added.
    """

    def __init__(self, bootstrap: str, topic: str, rates: FxRates | None = None) -> None:
        self.topic = topic
        self.rates = rates if rates is not None else FxRates()
        self._bootstrap = bootstrap
        self._codec = Codec.for_record("FxRate")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self.skipped = 0

    def start(self, timeout_s: float = 30.0) -> FxFeed:
        """Read the topic up to its end as of now, then keep following it in a daemon thread."""
        consumer = Consumer({"bootstrap.servers": self._bootstrap, "group.id": f"{self.topic}-reader",
                             "enable.auto.commit": False, "enable.partition.eof": False})
        metadata = consumer.list_topics(self.topic, timeout=timeout_s).topics.get(self.topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            consumer.close()
            raise RuntimeError(f"the FX rates topic {self.topic} does not exist (create the topics first)")
        partitions = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=timeout_s)[1] for p in partitions}
        consumer.assign(partitions)
        self._consumer = consumer
        deadline = time.monotonic() + timeout_s
        positions = {p: 0 for p in ends}
        while any(positions[p] < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                consumer.close()
                raise RuntimeError(f"reading the FX rates topic {self.topic} took over {timeout_s:g} s "
                                   f"(read {positions}, end {ends})")
            for msg in consumer.consume(500, POLL_S):
                if msg.error() is None:
                    self._take(msg.value())
                    positions[msg.partition()] = msg.offset() + 1
        log.info("FX rates: %d read from %s", len(self.rates), self.topic)
        self._thread = threading.Thread(target=self._follow, name="fx-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _follow(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            try:
                for msg in self._consumer.consume(500, POLL_S):
                    if msg.error() is None:
                        self._take(msg.value())
            except RuntimeError:  # closed under us by stop()
                return

    def _take(self, value: bytes | None) -> None:
        if value is None:  # a tombstone: rates are never deleted here (a later load overwrites)
            return
        try:
            record = self._codec.decode(value)
            self.rates.add(FxRate(record["date"], record["currency"], Decimal(record["rate"])))
        except (CodecError, InvalidOperation, KeyError, ValueError) as exc:
            self.skipped += 1
            log.error("skipping an unreadable FX rate on %s: %s", self.topic, exc)
