"""Publishing one batch of stage outputs, and the batch envelopes of the internal topics.

Why not faust's `topic.send`: measured on this machine, a faust agent that only consumes
does ~11,000 events/s, and one that also sends one record per event ~6,000/s; faust's
per-send machinery (futures, attachments, aiokafka's Python batch builder) costs as much
as consuming. So the agents hand a whole batch of outputs to one confluent-kafka producer
(`postback.kafka.AsyncProducer`, C batching, one future per batch) and the two internal
hops carry *envelopes*: one Kafka record per destination partition per batch, holding
many internal messages, so faust's per-event cost is paid once per envelope.

Guarantee (at-least-once): `publish` returns only when Kafka acknowledged every output of
the batch (`acks=all`, idempotent producer). `processors.runtime.checkpoint` calls it before
the agent asks for the next batch, and faust acks (and so may commit) a batch's source offsets only then. A
crash in between replays the batch; every stage is idempotent, so a replay re-emits the
same records. Failed publishes are retried with backoff, never dropped.

Partitioning: an internal message goes to `murmur2(key) % partitions`, Java's (and
confluent-kafka's `murmur2_random`) partition for that key, so the attribute topic stays
co-partitioned with the clicks topic (keyed by click_id by the ingester).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka.partitioner import murmur2

from postback.kafka import AsyncProducer, KafkaUnavailable
from processors.stages import Output, encode_internal, exact_amount
from processors.runtime.tables import Record
from schemas.codec import Codec

log = logging.getLogger("processors")

#: Kind of output -> the Avro record it is, for the public topics.
PUBLIC = {"conversion": "Conversion", "rejection": "Rejection", "duplicate": "Duplicate"}
#: Envelopes stay well under Kafka's default 1 MiB record limit.
ENVELOPE_MAX_BYTES = 256 * 1024
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0


def partition_for(key: str, partitions: int) -> int:
    """Java's default partition for a non-empty key (what the ingester's producer picks)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def encode_envelopes(items: Iterable[tuple[int, str]], max_bytes: int = ENVELOPE_MAX_BYTES
                     ) -> list[tuple[int, bytes]]:
    """(partition, message JSON) -> [(partition, JSON array)], in order within each partition."""
    by_partition: dict[int, list[list[str]]] = {}
    sizes: dict[int, int] = {}
    for partition, text in items:
        chunks = by_partition.setdefault(partition, [[]])
        if chunks[-1] and sizes[partition] + len(text) > max_bytes:
            chunks.append([])
            sizes[partition] = 0
        chunks[-1].append(text)
        sizes[partition] = sizes.get(partition, 0) + len(text) + 1
    return [(partition, ("[" + ",".join(chunk) + "]").encode())
            for partition, chunks in by_partition.items() for chunk in chunks]


def decode_envelope(value: bytes) -> list[dict[str, Any]]:
    """The internal messages of one envelope; Decimal amounts come back exact (see stages.encode_internal)."""
    records = json.loads(value)
    if not isinstance(records, list):
        raise ValueError("an internal envelope is a JSON array")
    return [exact_amount(record) for record in records]


class Publisher:
    """Turns a batch's `Output`s into Kafka records and waits until all are acknowledged."""

    def __init__(self, on_failure: Callable[[], Any], producer: AsyncProducer, public_topics: dict[str, str],
                 internal_topics: dict[str, str], partitions: int) -> None:
        self._on_failure = on_failure  # called for each failed attempt (a metric)
        self._producer = producer
        self._public = public_topics  # kind -> topic name
        self._internal = internal_topics  # kind -> topic name
        self._partitions = partitions
        self._codecs = {kind: Codec.for_record(record) for kind, record in PUBLIC.items()}
        self.published = 0

    def records(self, outputs: list[Output]) -> list[tuple[str, bytes | None, bytes, int | None]]:
        """Public outputs one record each (keyed, partitioned by the producer); internal ones in envelopes."""
        records: list[tuple[str, bytes | None, bytes, int | None]] = []
        internal: dict[str, list[tuple[int, str]]] = {}
        for out in outputs:
            if out.kind in self._public:
                # Built by the stages from normalised, typed values; tests/processors encode every
                # kind of stage output *with* validation, so the hot path skips it (2/3 of encode time).
                value = self._codecs[out.kind].encode(out.record, validated=False)
                records.append((self._public[out.kind], out.key.encode(), value, None))
            elif out.kind in self._internal:
                internal.setdefault(out.kind, []).append(
                    (partition_for(out.key, self._partitions), encode_internal(out.record)))
            else:
                raise ValueError(f"no topic for output kind {out.kind!r}")
        for kind, items in internal.items():
            records.extend((self._internal[kind], None, value, partition)
                           for partition, value in encode_envelopes(items))
        return records

    async def publish(self, outputs: list[Output], stopping: Callable[[], bool] = lambda: False,
                      changelog: Sequence[Record] = ()) -> dict[tuple[str, int], int]:
        """Send the outputs and the batch's table `changelog` records (first, in write order),
        wait for every acknowledgement; retry the whole batch with backoff until it is.

        Returns the highest acknowledged offset per (changelog topic, partition). Raises
        (`KafkaUnavailable`) only when `stopping()`; the batch is then not acked, so it is
        processed again after restart.
        """
        records = list(changelog) + self.records(outputs)
        changelog_topics = {record[0] for record in changelog}
        delay = RETRY_INITIAL_S
        while True:
            acked: dict[tuple[str, int], int] = {}

            def on_acked(msg: Any) -> None:
                if msg.topic() in changelog_topics:
                    where = (msg.topic(), msg.partition())
                    acked[where] = max(acked.get(where, -1), msg.offset())

            try:
                await self._producer.send_batch(records, on_acked if changelog_topics else None)
                self.published += len(records)
                return acked
            except KafkaUnavailable as exc:
                self._on_failure()
                if stopping():
                    raise
                log.warning("publishing %d records failed (%s); retrying in %.1f s", len(records), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def close(self, timeout: float = 10.0) -> None:
        await self._producer.close(timeout)
