"""A faust Table whose changelog records leave with the batch's outputs.

Why: a faust table sends one changelog record per write through faust's producer, and
measured here that costs ~0.11 ms of CPU per record (`python -m bench.faust_floor --mode send`),
more than all of a postback's own logic. `BatchTable` keeps faust's table (RocksDB store,
recovery from the changelog on start and rebalance, partition ownership) and only changes
*how* a write reaches the changelog: it serializes the record exactly as faust would and
queues it; the agent takes the queue after its batch (`take_changelog`) and publishes it
with the outputs through one confluent-kafka producer (`processors.runtime.publish`),
in the order `processors.runtime.checkpoint` states.

Guarantee: the changelog records of a batch are acknowledged by Kafka before the batch's
events are acked, so no committed input lacks its state change (faust's own path only
promises that at the next commit's producer flush). The persisted changelog offset that
faust keeps in RocksDB (where recovery resumes from) is set from the acknowledgements,
as faust's own `_on_changelog_sent` does.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.types import TP

#: (topic, key, value, partition) as `postback.kafka.AsyncProducer.send_batch` takes them.
Record = tuple[str, bytes | None, bytes | None, int]


class _Queued:
    """What faust's `on_key_set`/`on_key_del` read from a send's result: the partition."""

    __slots__ = ("message", "partition")

    def __init__(self, partition: int) -> None:
        self.message = self
        self.partition = partition


class BatchTable(faust.Table):
    """faust.Table with a queued changelog; the owner must publish `take_changelog()` after each batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unsent: list[Record] = []

    def send_changelog(self, partition: int | None, key: Any, value: Any, key_serializer: Any = None,
                       value_serializer: Any = None) -> Any:
        if partition is None:  # faust passes None only with use_partitioner, which these tables never use
            raise RuntimeError(f"table {self.name}: a changelog write needs the current event's partition")
        topic = self.changelog_topic
        key_bytes, _ = topic.prepare_key(key, key_serializer or self.key_serializer)
        value_bytes, _ = topic.prepare_value(value, value_serializer or self.value_serializer)
        self._unsent.append((topic.get_topic_name(), key_bytes, value_bytes, partition))
        return _Queued(partition)

    def take_changelog(self) -> list[Record]:
        """The queued changelog records, in write order; the queue is empty afterwards."""
        records, self._unsent = self._unsent, []
        return records

    def partition_items(self, partition: int, after: bytes | None = None,
                        limit: int | None = None) -> tuple[list[tuple[Any, Any]], bytes | None]:
        """One partition's entries, decoded, in RocksDB key order: those after the stored key
        `after` (from the start when None), at most `limit`. Also returns the stored key to
        pass as `after` for the next chunk, or None when this chunk reached the end.

        Why not `items()`: faust's iterates every partition's store of the worker, and an
        expiry tick runs per partition; a large table would block the event loop.
        """
        store = self.data
        if not getattr(store, "use_rocksdict", False) or not hasattr(store, "_db_for_partition"):
            raise RuntimeError(f"table {self.name}: partition_items needs faust's rocksdict store")
        db = store._db_for_partition(partition)
        out: list[tuple[Any, Any]] = []
        for key, value in (db.items() if after is None else db.items(from_key=after)):
            if key == store.offset_key or key == after:
                continue
            out.append((store._decode_key(key), store._decode_value(value)))
            if limit is not None and len(out) >= limit:
                return out, key
        return out, None

    def changelog_acked(self, partition: int, offset: int) -> None:
        """Kafka acknowledged this table's changelog up to `offset` on `partition`."""
        self.data.set_persisted_offset(TP(self.changelog_topic.get_topic_name(), partition), offset)


def batch_table(app: faust.App, name: str, partitions: int) -> BatchTable:
    """A `BatchTable` registered like `app.Table(name, default=None, key_type=str, value_type=None)`
    (str keys and dict values: faust's json serializer for both)."""
    table = BatchTable(app, name=name, default=None, beacon=app.tables.beacon, partitions=partitions,
                       key_type=str, value_type=None)
    app.tables.add(table)
    return table
