"""faust's aiokafka consumer, with two fixes the processors depend on.

1. **Fetch wait.** faust builds its aiokafka consumer with a hard-coded
   `fetch_max_wait_ms=1500`. aiokafka keeps one fetch request per broker in flight and
   leaves out of it the partitions that still hold buffered records. When such a request
   holds only idle partitions (a quiet clicks topic, internal topics between batches), the
   broker holds it for the full 1.5 s and the busy partitions wait behind it: up to 1.5 s
   per hop although records are there (seen in `python -m bench.e2e` as a steady ~2 s lag at
   1,000 postbacks/s, in some runs). This consumer uses the app's `fetch_max_wait_ms`.

2. **No record is skipped, and no commit passes a record that was not processed.**
   Seen in the crash-recovery runs of docs/benchmarks.md (now the test
   tests/processors/test_crash_recovery.py: SIGKILL, state deleted, restart): after a
   restart that rebuilt the tables from their changelogs, faust 0.15.3 resumed the
   stream partitions, seeked them to the committed offsets, and the first records it
   delivered were ~90 past the committed offset on every partition (a fetch issued
   before the seek, answered after it). faust treats such a jump as a "gap" (meant for
   transaction markers and compaction, which the processors' input topics never have),
   counts the missing offsets as acknowledged, and commits past them: the receipts in
   them were never processed. Its commit arithmetic has a second hole: the record *at*
   the committed offset is never required to be acknowledged (`_new_offset` and
   `_add_gap` are off by one), so one lost record there is committed over too.

   What this consumer guarantees, per stream partition (topics with acks enabled; table
   changelogs are compacted and are left as faust reads them):
   - records reach the streams in offset order without holes, starting at the committed
     offset (the log start where nothing was committed yet): a record past the next
     expected offset is not delivered; the partition is seeked back to the expected
     offset and read again (the app's `on_stream_hole` hears "reseeked");
   - except when the missing records are gone from the log (retention deleted them,
     the log start is past them), or when re-reading gives the same hole MAX_RESEEKS
     times (offsets without records: transaction markers of an upstream transactional
     producer, compaction): then the hole is logged, reported ("accepted") and
     committed over, as there is nothing to deliver;
   - a commit never goes past an offset that was neither acknowledged nor an accepted
     hole.

Relies on faust 0.15.3's consumer internals (`getmany`, `perform_seek`, `seek`, `_new_offset`,
`_add_gap`, `_gap`, `_acked`, `_committed_offset`, `_new_consumer_thread`,
`_create_worker_consumer`) and aiokafka 0.14.0's `_fetch_max_wait_ms`; pyproject.toml pins
those versions, and `processors.runtime.compat` refuses to start on another layout.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

log = logging.getLogger("processors.consumer")

#: A hole that comes back this many times right after re-reading it is accepted as empty offsets.
MAX_RESEEKS = 3


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka when the consumer starts (it builds its fetcher then); see compat.
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer


class ContiguousConsumer(faust_aiokafka.Consumer):
    """faust's aiokafka consumer: the app's fetch wait, hole-free delivery, commits that never skip."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: stream partition -> the offset the next delivered record must have
        self._expected: dict[TP, int] = {}
        #: partition -> (the hole last re-read, how many times in a row it came back)
        self._reseeks: dict[TP, tuple[tuple[int, int], int]] = {}
        #: rebalances completed (seeks to the committed offsets); lets agents reset what they track per partition
        self.seeks = 0

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        """After a rebalance: every assigned partition's next record is its committed offset."""
        await super().perform_seek()
        assigned = self.assignment()
        expected = {tp: offset for tp, offset in self._committed_offset.items()
                    if offset is not None and tp in assigned}
        # Never committed (a new group, or a worker killed before its first commit there):
        # with auto_offset_reset=earliest the next record is the log start's.
        fresh = [tp for tp in assigned if tp not in expected and self.app.topics.acks_enabled_for(tp.topic)]
        if fresh and self.app.conf.consumer_auto_offset_reset == "earliest":
            expected.update({tp: offset for tp, offset in (await self._log_starts(*fresh)).items()
                             if offset is not None})
        self._expected = expected
        self._reseeks.clear()
        self.seeks += 1
        log.info("stream partitions seeked to their committed offsets: %s",
                 ", ".join(f"{tp.topic}:{tp.partition}@{offset}" for tp, offset in sorted(self._expected.items())))

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self._expected[partition] = offset

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Any]]:
        holed: set[TP] = set()
        acks_enabled_for = self.app.topics.acks_enabled_for
        async for tp, message in super().getmany(timeout):
            if tp in holed:
                continue
            expected = self._expected.get(tp)
            offset = message.offset
            if expected is not None and offset > expected and acks_enabled_for(tp.topic):
                if not await self._on_hole(tp, expected, offset):
                    holed.add(tp)
                    continue
            if expected is None or offset >= expected:
                self._expected[tp] = offset + 1
            yield tp, message

    async def _on_hole(self, tp: TP, expected: int, offset: int) -> bool:
        """Records `expected`..`offset - 1` were not delivered: read them again (False), or,
        when the log no longer has them, commit over them (True: deliver `offset`)."""
        if tp not in self.assignment():  # revoked meanwhile (a rebalance): its next owner reads it
            return False
        earliest = (await self._log_starts(tp)).get(tp)
        if earliest is not None and earliest > expected:
            log.error("%s: offsets %d..%d are gone from the log (log start %d): committing over them",
                      tp, expected, earliest - 1, earliest)
            return self._accept(tp, expected, offset)
        hole = (expected, offset)
        seen = self._reseeks[tp][1] + 1 if self._reseeks.get(tp, ((), 0))[0] == hole else 1
        if seen > MAX_RESEEKS:
            log.warning("%s: reading from %d gave %d %d times: offsets %d..%d hold no records (transaction "
                        "markers or compaction); committing over them", tp, expected, offset, MAX_RESEEKS,
                        expected, offset - 1)
            return self._accept(tp, expected, offset)
        self._reseeks[tp] = (hole, seen)
        self.app.on_stream_hole("reseeked")
        log.warning("%s: the next record was %d, not %d: seeking back to %d to read the records between",
                    tp, offset, expected, expected)
        await self.seek(tp, expected)
        return False

    async def _log_starts(self, *tps: TP) -> dict[TP, int | None]:
        """The partitions' log start offsets; unknown (None) when the broker does not answer,
        which costs at most a re-read, never a record."""
        try:
            return dict(await self.earliest_offsets(*tps))
        except Exception as exc:  # noqa: BLE001 - a broker hiccup must not stop the fetch loop
            log.warning("could not read the log start offsets of %s: %r", sorted(tps), exc)
            return {}

    def _accept(self, tp: TP, expected: int, offset: int) -> bool:
        self.app.on_stream_hole("accepted")
        self._reseeks.pop(tp, None)
        self._gap[tp].addi(expected, offset)
        self._gap[tp].merge_overlaps()
        return True

    def _new_offset(self, tp: TP) -> int | None:
        committed = self._committed_offset[tp]
        acked = self._acked[tp]
        if committed is not None and acked:
            gap = self._gap[tp]
            lowest = min(min(acked), gap.begin() if gap else min(acked))
            if lowest > committed:  # the record at the committed offset is not done yet
                return None
        return super()._new_offset(tp)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """faust's gap (offsets it never saw, counted as acknowledged) is refused on stream
        partitions: `getmany` delivers no holes except accepted ones (already in `_gap`),
        so any other gap would mean records were lost."""
        if self._gap[tp].overlaps_point(offset_from):
            return
        log.warning("%s: faust saw a gap %d..%d (records fetched before a seek?); not counting it as "
                    "acknowledged: commits wait until those offsets are processed", tp, offset_from, offset_to)

