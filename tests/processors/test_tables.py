"""`processors.tables.BatchTable.partition_items` over faust's real RocksDB store."""

from __future__ import annotations

from pathlib import Path

import pytest
from faust.types import TP

from postback.config import ProcessOptions, Settings
from postback.partners import PartnerConfig
from processors.app import create_app


def _table(tmp_path: Path, name: str = "dedupe"):  # type: ignore[no-untyped-def]
    app = create_app(Settings.from_env(), "127.0.0.1:1", PartnerConfig.empty(), ProcessOptions(), tmp_path)
    table = app.tables[name]
    store = table.data
    for partition, keys in ((0, ["d:a", "d:b", "d:c"]), (1, ["d:z"])):
        db = store._db_for_partition(partition)
        for key in keys:
            db.put(store._encode_key(key), store._encode_value({"t": 1, "k": key}))
        # faust keeps the changelog offset in the same RocksDB under its own key: not an entry
        store.set_persisted_offset(TP(table.changelog_topic.get_topic_name(), partition), 7)
    return table


def test_one_partition_in_chunks_without_the_offset_key(tmp_path: Path) -> None:
    table = _table(tmp_path)
    first, after = table.partition_items(0, None, 2)
    assert first == [("d:a", {"t": 1, "k": "d:a"}), ("d:b", {"t": 1, "k": "d:b"})] and after is not None
    rest, end = table.partition_items(0, after, 2)
    assert rest == [("d:c", {"t": 1, "k": "d:c"})] and end is None
    assert table.partition_items(1) == ([("d:z", {"t": 1, "k": "d:z"})], None)


def test_refuses_a_store_without_partitions(tmp_path: Path) -> None:
    table = _table(tmp_path)
    table.data.use_rocksdict = False  # e.g. faust's python-rocksdb driver: not supported
    with pytest.raises(RuntimeError, match="rocksdict"):
        table.partition_items(0)
