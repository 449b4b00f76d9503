"""When each entry of the `pending` table (conversions waiting for a late click) needs a tick.

Why: a tick used to decode every pending entry of its partition, every second. When many
conversions wait (a partner whose clicks we never see: each of its conversions waits the
whole late-click wait, 10 minutes by default), that is hundreds of thousands of entries
decoded per second. This index, in memory, knows each entry's next visit (its earliest
deadline, or when its emitted items may be forgotten; `stages.next_visit_ms`), so a tick
visits only the entries that are due.

Replays (at-least-once): a tick processed again after a crash must re-emit exactly what it
emitted before (`stages._release`), so it must visit the entries it changed, although
those are no longer due. A replay only happens after a restart or rebalance, and the index
is rebuilt then from the table (one full scan of the partition, on its first tick). For
EMITTED_GRACE_MS after a rebuild, every entry with an item emitted in the grace period
before the rebuild is visited on every tick as well: any replayed tick finds its own.

In memory only, per worker; `follow(generation)` resets it on every rebalance (the worker's
partitions change).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from processors.stages import EMITTED_GRACE_MS, next_visit_ms, recently_emitted


class PendingIndex:
    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[int, str]]] = {}  # partition -> (visit at, click id), lazily deleted
        self._visit_at: dict[str, int] = {}  # click id -> its current visit time (heap items that differ are stale)
        self._replay: dict[int, tuple[int, set[str]]] = {}  # partition -> (until, click ids revisited until then)
        self._generation: int | None = None  # the consumer's rebalance count this index was built in

    def follow(self, generation: int) -> "PendingIndex":
        """The index for the consumer's current rebalance count: reset when it changed."""
        if generation != self._generation:
            self.reset()
            self._generation = generation
        return self

    def reset(self) -> None:
        """Forget everything: each partition is rebuilt from the table on its next tick."""
        self._heaps.clear()
        self._visit_at.clear()
        self._replay.clear()

    def built(self, partition: int) -> bool:
        return partition in self._heaps

    def rebuild(self, partition: int, entries: Iterable[tuple[str, Any]], now_ms: int) -> None:
        """From all of the partition's pending entries (decoded): their visit times, and the
        entries a replayed tick may have changed (see the module docstring)."""
        self._heaps[partition] = []  # built from here on
        recent: set[str] = set()
        for click_id, waiting in entries:
            self.schedule(partition, click_id, next_visit_ms(waiting))
            if recently_emitted(waiting, now_ms - EMITTED_GRACE_MS):
                recent.add(click_id)
        self._replay[partition] = (now_ms + EMITTED_GRACE_MS, recent)

    def schedule(self, partition: int, click_id: str, visit_at: int | None) -> None:
        """The entry's next visit (None: the entry is gone). Ignored until the partition is
        built: `rebuild` then reads the entry from the table with everything else."""
        heap = self._heaps.get(partition)
        if heap is None:
            return
        if visit_at is None:
            self._visit_at.pop(click_id, None)
            return
        if self._visit_at.get(click_id) == visit_at:
            return
        self._visit_at[click_id] = visit_at
        heapq.heappush(heap, (visit_at, click_id))

    def due(self, partition: int, now_ms: int, limit: int) -> list[str]:
        """Click ids to visit on this tick: at most `limit` due ones (the rest on later ticks),
        plus, within a replay window, the recently changed ones. Each at most once."""
        heap = self._heaps.get(partition, [])
        out: list[str] = []
        seen: set[str] = set()
        while heap and heap[0][0] <= now_ms and len(out) < limit:
            visit_at, click_id = heapq.heappop(heap)
            if self._visit_at.get(click_id) == visit_at and click_id not in seen:
                del self._visit_at[click_id]  # visited: the caller schedules it again if it stays
                seen.add(click_id)
                out.append(click_id)
        until, recent = self._replay.get(partition, (0, set()))
        if now_ms <= until:
            out.extend(sorted(recent - seen))
        else:
            self._replay.pop(partition, None)
        return out
