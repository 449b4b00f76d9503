"""`processors.sweep.Sweep`: chunked passes over a table partition, a new pass at most every interval."""

from __future__ import annotations

from typing import Any

import pytest

from processors.sweep import Sweep


class Partitions:
    """Sorted keys per partition, scanned as BatchTable.partition_items scans RocksDB."""

    def __init__(self, **keys: list[str]) -> None:
        self.keys = {int(p[1:]): sorted(ks) for p, ks in keys.items()}

    def scan(self, partition: int, after: bytes | None, limit: int) -> tuple[list[tuple[Any, Any]], bytes | None]:
        rest = [k for k in self.keys[partition] if after is None or k.encode() > after]
        chunk = rest[:limit]
        return [(k, None) for k in chunk], (chunk[-1].encode() if len(rest) > limit else None)


def _keys(entries: list[tuple[Any, Any]]) -> list[str]:
    return [key for key, _ in entries]


def test_a_pass_visits_every_entry_once_in_chunks_then_waits_for_the_interval() -> None:
    table = Partitions(p0=["a", "b", "c", "d", "e"], p1=["x"])
    sweep = Sweep(table.scan, chunk=2, pass_interval_ms=1000)
    assert not sweep.in_pass(0)
    assert _keys(sweep.next_chunk(0, 0)) == ["a", "b"] and sweep.in_pass(0)
    assert [_keys(sweep.next_chunk(0, now)) for now in (1, 2)] == [["c", "d"], ["e"]]
    assert not sweep.in_pass(0)
    assert sweep.next_chunk(0, 500) == []  # pass done at t=2: the next starts at t=1002
    assert _keys(sweep.next_chunk(1, 500)) == ["x"]  # partitions have passes of their own
    assert _keys(sweep.next_chunk(0, 1002)) == ["a", "b"]


def test_entries_deleted_during_a_pass_do_not_stop_it() -> None:
    table = Partitions(p0=["a", "b", "c", "d"])
    sweep = Sweep(table.scan, chunk=2, pass_interval_ms=1000)
    assert _keys(sweep.next_chunk(0, 0)) == ["a", "b"]
    table.keys[0].remove("b")  # expired and deleted: the cursor's own key is gone
    assert _keys(sweep.next_chunk(0, 1)) == ["c", "d"]


def test_a_sweep_needs_a_positive_chunk() -> None:
    with pytest.raises(ValueError):
        Sweep(Partitions(p0=[]).scan, chunk=0, pass_interval_ms=1)
