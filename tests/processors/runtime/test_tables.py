"""`processors.runtime.tables.BatchTable` over faust's real RocksDB store: writes queue their
changelog records, and `partition_items` scans one partition in chunks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from postback.config import ProcessOptions, Settings
from postback.partners import PartnerConfig
from processors.app import create_app
from processors.runtime.context import enter


class _Event:
    """What a table write reads from the current event: its partition (held weakly by faust:
    keep a reference while writing)."""

    def __init__(self, partition: int) -> None:
        self.message = SimpleNamespace(topic="t", partition=partition, offset=0)


def _table(tmp_path: Path, name: str = "dedupe"):  # type: ignore[no-untyped-def]
    app = create_app(Settings.from_env(), "127.0.0.1:1", PartnerConfig.empty(), ProcessOptions(), tmp_path)
    table = app.tables[name]
    for partition, keys in ((0, ["d:a", "d:b", "d:c"]), (1, ["d:z"])):
        event = _Event(partition)
        assert enter(event) == partition
        for key in keys:
            table[key] = {"t": 1, "k": key}
        # faust keeps the changelog offset in the same RocksDB under its own key: not an entry
        table.changelog_acked(partition, 7)
    return table


def test_one_partition_in_chunks_without_the_offset_key(tmp_path: Path) -> None:
    table = _table(tmp_path)
    first, after = table.partition_items(0, None, 2)
    assert first == [("d:a", {"t": 1, "k": "d:a"}), ("d:b", {"t": 1, "k": "d:b"})] and after is not None
    rest, end = table.partition_items(0, after, 2)
    assert rest == [("d:c", {"t": 1, "k": "d:c"})] and end is None
    assert table.partition_items(1) == ([("d:z", {"t": 1, "k": "d:z"})], None)


def test_writes_queue_their_changelog_records_on_the_current_events_partition(tmp_path: Path) -> None:
    table = _table(tmp_path)
    records = table.take_changelog()
    topic = table.changelog_topic.get_topic_name()
    assert [(t, json.loads(k), json.loads(v), p) for t, k, v, p in records] == [
        (topic, key, {"t": 1, "k": key}, partition)
        for partition, key in ((0, "d:a"), (0, "d:b"), (0, "d:c"), (1, "d:z"))]
    assert table.take_changelog() == []  # taken once
    event = _Event(1)
    enter(event)
    del table["d:z"]
    [(_, key, value, partition)] = table.take_changelog()
    assert (json.loads(key), value, partition) == ("d:z", None, 1)  # a delete is a tombstone


def test_refuses_a_store_without_partitions(tmp_path: Path) -> None:
    table = _table(tmp_path)
    table.data.use_rocksdict = False  # e.g. faust's python-rocksdb driver: not supported
    with pytest.raises(RuntimeError, match="rocksdict"):
        table.partition_items(0)
