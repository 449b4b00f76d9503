"""What must be true before a batch's input offsets may be committed, in one place.

Guarantee (at-least-once, every stage idempotent): a committed input always has its state
change (table changelog records) and its outputs in Kafka. faust commits the offsets of
acked events; `Checkpoint.commit` is what a batch does between being handled and letting
faust ack it, and `Checkpoint.batch` keeps a rebalance from moving the batch's partitions
while it runs. The steps, in order:

0. The batch is in flight from its first handled event until `commit` returns
   (`with checkpoint.batch():`): a rebalance waits for it, bounded (`finish_batches`), so
   the partitions' new owner restores tables that include its writes.
1. The batch's changelog records are taken from every table, in write order.
2. Changelog records, then outputs, are sent through one idempotent producer (acks=all),
   and `commit` waits for every acknowledgement, retrying the whole batch until there is.
3. The acknowledged changelog offsets become the tables' persisted offsets (where a
   restore resumes).
4. `commit` returns; only then does the batch loop ask for the next batch, and faust acks
   the batch's events; `processors.runtime.consumer.ContiguousConsumer` commits an offset
   only once every record before it is acked.

A crash anywhere before step 4 leaves the events unacked: the batch is processed again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from processors.metrics import ProcessorMetrics
from processors.runtime.inflight import InFlight
from processors.runtime.publish import Publisher
from processors.runtime.tables import BatchTable, Record
from processors.stages import Output


class Checkpoint:
    """The commit path of every agent of one worker (one publisher, one in-flight barrier)."""

    def __init__(self, tables: Iterable[BatchTable], make_publisher: Callable[[], Publisher],
                 metrics: ProcessorMetrics, stopping: Callable[[], bool]) -> None:
        self._tables = {table.changelog_topic.get_topic_name(): table for table in tables}  # by changelog topic
        self._make_publisher = make_publisher  # called on the worker's event loop, by the first batch to publish
        self._publisher: Publisher | None = None
        self._metrics = metrics
        self._stopping = stopping
        self.in_flight = InFlight()

    def batch(self) -> InFlight:
        """Step 0: `with checkpoint.batch():` around handling a batch and committing it."""
        return self.in_flight

    async def commit(self, agent: str, events: int, outputs: list[Output]) -> None:
        """Make the batch just handled safe to ack: its changelog and outputs acknowledged by Kafka.

        Raises only when the worker is stopping (the publish gave up): the batch's events
        must then not be acked.
        """
        changelog = self._take_changelog()  # 1
        self._metrics.batch(agent, events, (out.kind for out in outputs), len(changelog))
        if not outputs and not changelog:
            return  # 4: nothing to wait for
        acked = await self._publish(outputs, changelog)  # 2
        self._persist_offsets(acked)  # 3
        # 4: returning lets the batch loop take the next batch, and faust ack this one.

    def _take_changelog(self) -> list[Record]:
        """Step 1: the changelog records queued since the last take, in write order per table.

        Guarantee: exactly this batch's writes. A batch is handled without yielding to the
        event loop, so no other agent's writes can be in between."""
        return [record for table in self._tables.values() for record in table.take_changelog()]

    async def _publish(self, outputs: list[Output], changelog: Sequence[Record]) -> dict[tuple[str, int], int]:
        """Step 2: changelog records first, then outputs; returns once Kafka acknowledged all of
        them, with the highest acknowledged offset per (changelog topic, partition).

        Guarantee: never returns with a record unacknowledged; retries with backoff until
        acknowledged, and raises (`KafkaUnavailable`) only when the worker is stopping."""
        started = time.monotonic()
        acked = await self._publisher_now().publish(outputs, stopping=self._stopping, changelog=changelog)
        self._metrics.publish_seconds.observe(time.monotonic() - started)
        return acked

    def _persist_offsets(self, acked: dict[tuple[str, int], int]) -> None:
        """Step 3: a table partition's persisted changelog offset (kept in its RocksDB, where
        recovery resumes) is set only from Kafka's acknowledgements, as faust's own path does."""
        for (topic, partition), offset in acked.items():
            self._tables[topic].changelog_acked(partition, offset)

    async def finish_batches(self, timeout: float) -> bool:
        """Step 0, on a rebalance: True once no batch is in flight; False after `timeout` seconds."""
        return await self.in_flight.idle(timeout)

    async def close(self) -> None:
        """Close the publisher, if a batch made one."""
        if self._publisher is not None:
            await self._publisher.close()

    def _publisher_now(self) -> Publisher:
        if self._publisher is None:
            self._publisher = self._make_publisher()
        return self._publisher
