"""Kafka client wrappers: producer configuration and an asyncio bridge for the producer.

Why a bridge: confluent-kafka's producer is thread-safe and batches internally, but its
delivery reports arrive through `poll()`. `AsyncProducer` runs `poll()` in one background
thread and hands the reports back to the event loop in batches (one loop wake-up per
poll, not one per record), so a request handler can `await` the broker's acknowledgement
without blocking the loop.

Guarantee: `send()` returns only after the broker acknowledged the record with
`acks=all` (idempotent producer). It raises `KafkaUnavailable` when the local queue is
full or the record was not acknowledged within `message.timeout.ms` (the delivery
deadline): in both cases the record is *not* known to be in Kafka, and the caller must
not claim it is.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Producer

log = logging.getLogger(__name__)


class KafkaUnavailable(RuntimeError):
    """The record was not acknowledged: queue full, deadline passed, or a delivery error."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def producer_config(bootstrap_servers: str, delivery_timeout_s: float = 5.0, **overrides: Any) -> dict[str, Any]:
    """Settings every producer of this project uses.

    `murmur2_random` is Java's partitioner, so our keys land on the same partitions as
    keys written by JVM producers (and faust) for co-partitioned joins.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap_servers,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10000,
        "compression.type": "lz4",
        "partitioner": "murmur2_random",
        "message.timeout.ms": int(delivery_timeout_s * 1000),
        "queue.buffering.max.messages": 200000,
        "queue.buffering.max.kbytes": 262144,
        "socket.keepalive.enable": True,
        "reconnect.backoff.max.ms": 1000,
    }
    config.update(overrides)
    return config


class AsyncProducer:
    """An idempotent producer whose acknowledgements are awaitable on one event loop."""

    def __init__(self, config: Mapping[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self._config = dict(config)
        self._config.setdefault("error_cb", self._on_error)
        self._loop = loop
        self._deadline_s = self._config.get("message.timeout.ms", 5000) / 1000.0
        self._producer = Producer(self._config)
        self._pending: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_loop, name="kafka-poll", daemon=True)
        self._thread.start()
        self.delivery_errors = 0
        self.last_error: str | None = None
        self._fatal = False

    # -- event-loop side -------------------------------------------------------------
    async def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Produce one record and wait for the broker's acknowledgement."""
        if self._fatal:
            self._rebuild()
        future: asyncio.Future[None] = self._loop.create_future()
        try:
            self._producer.produce(topic, value, key, on_delivery=lambda err, _msg: self._collect(future, err))
        except BufferError as exc:
            self.delivery_errors += 1
            raise KafkaUnavailable("queue_full", "the producer's local queue is full") from exc
        except Exception as exc:  # KafkaException for a fatal producer state, etc.
            self.delivery_errors += 1
            raise KafkaUnavailable("produce_failed", str(exc)) from exc
        try:
            # librdkafka enforces the deadline itself (message.timeout.ms); this bound only
            # guards against a lost callback.
            await asyncio.wait_for(asyncio.shield(future), self._deadline_s + 5.0)
        except TimeoutError as exc:
            raise KafkaUnavailable("timeout", f"no acknowledgement within {self._deadline_s:.1f}s") from exc

    def queue_depth(self) -> int:
        """Records produced but not yet acknowledged or failed."""
        return len(self._producer)

    async def ready(self, timeout: float = 2.0) -> bool:
        """True when the cluster answers a metadata request."""
        def probe() -> bool:
            try:
                self._producer.list_topics(timeout=timeout)
                return True
            except Exception:  # noqa: BLE001 - any failure means not reachable
                return False

        return await self._loop.run_in_executor(None, probe)

    async def close(self, timeout: float = 10.0) -> int:
        """Flush what is queued (bounded by `timeout`), stop polling; returns records left undelivered."""
        left = await self._loop.run_in_executor(None, self._producer.flush, timeout)
        self._stop.set()
        await self._loop.run_in_executor(None, self._thread.join, 5.0)
        return int(left)

    def _rebuild(self) -> None:
        """Replace a producer that hit a fatal error (e.g. fenced idempotence state).

        Its unacknowledged records are purged, which fails their pending sends: none of
        them was acknowledged, so none was answered as accepted.
        """
        old, self._producer = self._producer, Producer(self._config)
        self._fatal = False
        old.purge()
        old.flush(0)
        log.warning("replaced the Kafka producer after a fatal error")

    def _resolve(self, batch: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
        for future, err in batch:
            if future.done():
                continue
            if err is None:
                future.set_result(None)
            else:
                self.delivery_errors += 1
                self.last_error = err.str()
                reason = "timeout" if err.code() == KafkaError._MSG_TIMED_OUT else "delivery_failed"
                future.set_exception(KafkaUnavailable(reason, err.str()))

    # -- poll-thread side ------------------------------------------------------------
    def _collect(self, future: asyncio.Future[None], err: KafkaError | None) -> None:
        with self._lock:
            self._pending.append((future, err))

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            with self._lock:
                batch, self._pending = self._pending, []
            if batch:
                try:
                    self._loop.call_soon_threadsafe(self._resolve, batch)
                except RuntimeError:  # loop closed during shutdown
                    return

    def _on_error(self, err: KafkaError) -> None:
        self.last_error = err.str()
        if err.fatal():
            self._fatal = True
            log.error("fatal Kafka producer error: %s", err.str())
        else:
            log.warning("Kafka producer: %s", err.str())
