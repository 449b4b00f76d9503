"""The lifecycle router: attributed conversions -> one topic per event family, exactly once.

Retention systems consume `<prefix>.lifecycle.{acquisition,purchase,subscription,reversal}`.
Each conversion record (every version: a status change is news to them too) appears once
per topic even across router crashes: consume -> produce -> commit happen in one Kafka
transaction (`send_offsets_to_transaction`, KIP-447 fencing by consumer-group metadata),
and readers use `isolation.level=read_committed`. Values are the original Avro
single-object bytes, unchanged; keys are customer_id, else order_id, else conversion_id.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer

from postback.config import SinkOptions
from postback.topics import Topics
from schemas.codec import Codec, CodecError

log = logging.getLogger("sinks.lifecycle")

FAMILIES = {
    "lead": "acquisition", "signup": "acquisition", "install": "acquisition",
    "purchase": "purchase",
    "trial_start": "subscription", "subscription_start": "subscription", "renewal": "subscription",
    "upgrade": "subscription", "cancel": "subscription",
    "refund": "reversal", "chargeback": "reversal",
}


def family_of(event: str) -> str | None:
    """The lifecycle family of a canonical event; custom events have none (not routed)."""
    return FAMILIES.get(event)


def route(conversion: dict[str, Any]) -> tuple[str, str] | None:
    """(family, key) for an attributed conversion, or None when it is not routed."""
    if not conversion["attributed"]:
        return None
    family = family_of(conversion["event"])
    if family is None:
        return None
    key = conversion["customer_id"] or conversion["order_id"] or conversion["conversion_id"]
    return family, key


class LifecycleRouter:
    def __init__(self, bootstrap: str, topics: Topics, opts: SinkOptions, instance: str | None = None) -> None:
        self.topics = topics
        self.family_topics = {"acquisition": topics.lifecycle_acquisition.name,
                              "purchase": topics.lifecycle_purchase.name,
                              "subscription": topics.lifecycle_subscription.name,
                              "reversal": topics.lifecycle_reversal.name}
        self.codec = Codec.for_record("Conversion")
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap, "group.id": topics.sink_lifecycle_group,
            "enable.auto.commit": False, "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "session.timeout.ms": int(opts.session_timeout_s * 1000),
        })
        self.producer = Producer({
            "bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5,
            "transactional.id": f"{topics.prefix}-lifecycle-{instance or socket.gethostname()}",
            "transaction.timeout.ms": 30000,
        })
        self.routed = 0

    def run(self, stop: threading.Event) -> None:
        self.producer.init_transactions(30)
        self.consumer.subscribe([self.topics.conversions.name])
        try:
            while not stop.is_set():
                messages = [m for m in self.consumer.consume(5000, timeout=0.2) if not m.error()]
                if messages:
                    self._transaction(messages, stop)
        finally:
            self.consumer.close()

    def _transaction(self, messages: list[Any], stop: threading.Event) -> None:
        try:
            self.producer.begin_transaction()
            for msg in messages:
                try:
                    target = route(self.codec.decode(msg.value()))
                except CodecError as exc:
                    log.error("skipping undecodable conversion at %s[%d]@%d: %s", msg.topic(), msg.partition(),
                              msg.offset(), exc)
                    continue
                if target is not None:
                    family, key = target
                    self.producer.produce(self.family_topics[family], msg.value(), key.encode())
                    self.routed += 1
            positions = [tp for tp in self.consumer.position(self.consumer.assignment()) if tp.offset >= 0]
            self.producer.send_offsets_to_transaction(positions, self.consumer.consumer_group_metadata(), 10)
            self.producer.commit_transaction(10)  # bounded: SIGTERM must end the process within the supervisor's 30 s
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            log.error("lifecycle transaction failed (%s); finishing it and re-reading from the last commit", error)
            if not (error.txn_requires_abort() or error.retriable()):
                raise
            self._finish_failed(error, stop)
            if not stop.is_set():  # stopping: the next owner starts from the last commit anyway
                self._rewind()

    def _finish_failed(self, error: KafkaError, stop: threading.Event) -> None:
        """Leave the producer ready for the next transaction after a failed one.

        A retriable failure (e.g. a commit that timed out while the broker restarted) may
        still commit on retry; otherwise, or when asked to stop, the transaction is aborted,
        so its records are never visible to read_committed consumers.
        """
        attempts = 0 if error.txn_requires_abort() else 3
        for _ in range(attempts):
            if stop.is_set():
                break
            try:
                self.producer.commit_transaction(10)
                return
            except KafkaException as again:
                if again.args[0].txn_requires_abort():
                    break
                if not again.args[0].retriable():
                    raise
        try:
            self.producer.abort_transaction(10)
        except KafkaException as exc:
            if not exc.args[0].retriable():
                raise
            log.warning("abort did not complete (%s); the broker times the transaction out", exc.args[0])

    def _rewind(self) -> None:
        """Seek every assigned partition back to its committed offset (the aborted batch is re-read)."""
        assignment = self.consumer.assignment()
        for tp in self.consumer.committed(assignment, timeout=30):
            if tp.offset >= 0:
                self.consumer.seek(tp)
