"""Expiry that walks a table partition a chunk at a time, so state stays bounded without
ever blocking the worker's event loop for long.

Why: a pass over a whole table on one tick decodes every entry in one go; with ~100,000
dedupe entries that held faust's event loop for ~7 s (every timer 7 s late, measured in a
worker's log from `python -m bench.process --postbacks 100000`). A `Sweep` visits at most `chunk`
entries per tick of a partition and remembers where it stopped; a new pass over a
partition starts at most every `pass_interval_ms`.

The cursor is kept in memory only: after a restart or rebalance a pass starts over. That
is safe for deletions of expired entries (deleting twice is a no-op) and is the only use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: (partition, after, limit) -> (entries, next `after` or None at the end); see BatchTable.partition_items.
Scan = Callable[[int, bytes | None, int], tuple[list[tuple[Any, Any]], bytes | None]]


class Sweep:
    def __init__(self, scan: Scan, chunk: int, pass_interval_ms: int) -> None:
        if chunk < 1:
            raise ValueError("a sweep chunk must hold at least one entry")
        self._scan = scan
        self._chunk = chunk
        self._pass_interval_ms = pass_interval_ms
        self._cursor: dict[int, bytes] = {}  # partition -> where its pass stopped
        self._next_pass_ms: dict[int, int] = {}  # partition -> earliest start of its next pass

    def in_pass(self, partition: int) -> bool:
        """Whether a pass over `partition` has started and not reached the end yet."""
        return partition in self._cursor

    def next_chunk(self, partition: int, now_ms: int) -> list[tuple[Any, Any]]:
        """The next at most `chunk` entries of `partition` to check, or none between passes."""
        cursor = self._cursor.pop(partition, None)
        if cursor is None and now_ms < self._next_pass_ms.get(partition, 0):
            return []
        entries, after = self._scan(partition, cursor, self._chunk)
        if after is None:
            self._next_pass_ms[partition] = now_ms + self._pass_interval_ms
        else:
            self._cursor[partition] = after
        return entries
