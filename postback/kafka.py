"""Kafka client wrappers: producer configuration and an asyncio bridge for the producer.

Why a bridge: confluent-kafka's producer batches internally (linger), but its delivery
reports arrive only through `poll()`. `AsyncProducer` calls the non-blocking `poll(0)`
from the event loop itself while records are in flight (every millisecond), so delivery
callbacks run on the loop and resolve their futures directly: no poll thread, no GIL
hand-offs, no cross-thread wake-ups. This buffering/sending split is what lets a request
handler `await` the broker's acknowledgement without blocking the loop.

Guarantee: `send()` returns only after the broker acknowledged the record with
`acks=all` (idempotent producer). It raises `KafkaUnavailable` when the local queue is
full or the record was not acknowledged within `message.timeout.ms` (the delivery
deadline, enforced by librdkafka for every record): in both cases the record is *not*
known to be in Kafka, and the caller must not claim it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, Producer

log = logging.getLogger(__name__)

#: Poll period while records await acknowledgement; idle producers are polled rarely.
BUSY_POLL_S = 0.001
IDLE_POLL_S = 0.1


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
        self._producer = Producer(self._config)
        self._inflight = 0
        self._fatal = False
        self._closed = False
        self.delivery_errors = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()
        self._poller = loop.create_task(self._poll_forever(), name="kafka-poll")

    async def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Produce one record and wait for the broker's acknowledgement."""
        await self.send_batch([(topic, key, value, None)])

    async def send_batch(self, records: Sequence[tuple[str, bytes | None, bytes | None, int | None]],
                         on_acked: Callable[[Any], None] | None = None) -> None:
        """Produce `(topic, key, value, partition or None)` records in order; wait for all acknowledgements.

        One future for the whole batch, not one per record: a stream processor publishes
        hundreds of outputs per batch. Raises `KafkaUnavailable` if any record was not
        acknowledged; the others may be in Kafka, so a caller that retries the batch must
        tolerate repeats (the processors' outputs are idempotent). `on_acked(message)` is
        called for each acknowledged record (it has `.topic()`, `.partition()`, `.offset()`).
        """
        if not records:
            return
        if self._closed:
            raise KafkaUnavailable("shutting_down", "the producer is closed")
        if self._fatal:
            self._rebuild()
        future: asyncio.Future[None] = self._loop.create_future()
        state: list[Any] = [len(records), None]  # records not yet reported, first failure

        def settle() -> None:
            if state[0] or future.done():
                return
            if state[1] is None:
                future.set_result(None)
            else:
                future.set_exception(state[1])

        def delivered(err: KafkaError | None, msg: Any) -> None:
            self._inflight -= 1
            state[0] -= 1
            if err is not None and state[1] is None:
                self.delivery_errors += 1
                self.last_error = err.str()
                reason = "timeout" if err.code() == KafkaError._MSG_TIMED_OUT else "delivery_failed"
                state[1] = KafkaUnavailable(reason, err.str())
            elif err is None and on_acked is not None:
                on_acked(msg)
            settle()

        produce = self._producer.produce
        for done, (topic, key, value, partition) in enumerate(records):
            try:
                if partition is None:
                    produce(topic, value, key, on_delivery=delivered)
                else:
                    produce(topic, value, key, partition=partition, on_delivery=delivered)
            except Exception as exc:  # BufferError: queue full; KafkaException: fatal state, etc.
                self.delivery_errors += 1
                state[0] -= len(records) - done  # these were never produced
                if state[1] is None:
                    state[1] = KafkaUnavailable("queue_full", "the producer's local queue is full") \
                        if isinstance(exc, BufferError) else KafkaUnavailable("produce_failed", str(exc))
                break
            self._inflight += 1
        if self._inflight:
            self._wake.set()
        settle()
        await future

    async def _poll_forever(self) -> None:
        while not self._closed:
            self._producer.poll(0)  # runs delivery callbacks, here, on the loop
            if self._inflight:
                await asyncio.sleep(BUSY_POLL_S)
                continue
            self._wake.clear()
            try:  # idle: sleep until a send wakes us (or poll now and then for errors/stats)
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
            except TimeoutError:
                pass

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
        """Deliver what is in flight (bounded by `timeout`), then fail what is left; returns that count.

        Records still undelivered by then are purged, which fails their pending sends
        (503), so no request waits forever and none is answered 202 without an ack.
        """
        deadline = self._loop.time() + timeout
        while self._inflight and self._loop.time() < deadline:
            await asyncio.sleep(BUSY_POLL_S * 5)
        left = self._inflight
        self._closed = True
        if left:
            self._producer.purge()
        self._producer.poll(0)  # deliver the purge reports (and any last acks)
        await asyncio.sleep(0)
        self._poller.cancel()
        return left

    def _rebuild(self) -> None:
        """Replace a producer that hit a fatal error (e.g. fenced idempotence state).

        Its unacknowledged records are purged, which fails their pending sends: none of
        them was acknowledged, so none was answered as accepted.
        """
        old, self._producer = self._producer, Producer(self._config)
        self._fatal = False
        old.purge()
        old.poll(0)
        log.warning("replaced the Kafka producer after a fatal error")

    def _on_error(self, err: KafkaError) -> None:
        self.last_error = err.str()
        if err.fatal():
            self._fatal = True
            log.error("fatal Kafka producer error: %s", err.str())
        else:
            log.warning("Kafka producer: %s", err.str())
