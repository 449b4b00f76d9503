"""`processors.runtime.consumer.ContiguousConsumer`: faust's consumer that never delivers a stream
partition with a hole and never commits past an unprocessed record.

The consumer here is the real class, built by the real processor app; only its link to a
broker (the fetched records, seeks, log start offsets) is replaced, so that each race the
class guards against can be played exactly. Restarts against the real broker are covered
by tests/processors/test_worker.py and tests/processors/test_crash_recovery.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka.structs import ConsumerRecord
from faust.types import TP

from postback.config import ProcessOptions, Settings
from postback.partners import PartnerConfig
from processors.app import create_app
from processors.runtime.consumer import MAX_RESEEKS, ContiguousConsumer

TOPIC = "t.raw-postbacks"
P0 = TP(TOPIC, 0)


def _record(offset: int) -> ConsumerRecord:
    return ConsumerRecord(TOPIC, 0, offset, 1_700_000_000_000, 0, b"k", b"v", None, 1, 1, [])


class Broker:
    """What the consumer fetches next, where it was seeked, and where the log starts."""

    def __init__(self, consumer: ContiguousConsumer, log_start: int = 0) -> None:
        self.fetches: list[list[int]] = []
        self.seeks: list[tuple[TP, int]] = []
        self.log_start = log_start
        self.holes: list[str] = []
        consumer._wait_next_records = self._next  # type: ignore[method-assign]
        consumer._seek = self._seek  # type: ignore[method-assign]
        consumer.earliest_offsets = self._earliest  # type: ignore[method-assign]
        consumer.highwater = lambda tp: 1_000  # type: ignore[method-assign]
        consumer.assignment = lambda: {P0}  # type: ignore[method-assign]
        consumer.app.topics.acks_enabled_for = lambda topic: True  # type: ignore[method-assign]
        consumer.app.on_stream_hole = self.holes.append

    async def _next(self, timeout: float) -> tuple[dict, set]:
        return {P0: [_record(o) for o in self.fetches.pop(0)]}, {P0}

    async def _seek(self, tp: TP, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def _earliest(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.log_start for tp in tps}


def _consumer(tmp_path: Path) -> ContiguousConsumer:
    app = create_app(Settings.from_env(), "127.0.0.1:1", PartnerConfig.empty(), ProcessOptions(), tmp_path)
    consumer = app.consumer
    assert isinstance(consumer, ContiguousConsumer)
    return consumer


async def _delivered(consumer: ContiguousConsumer) -> list[int]:
    return [message.offset async for _tp, message in consumer.getmany(timeout=0.1)]


def _seeked_to(consumer: ContiguousConsumer, offset: int) -> None:
    """As perform_seek leaves it: the partition's next record is its committed offset."""
    consumer._committed_offset[P0] = offset
    consumer._expected[P0] = offset


def test_a_fetch_that_starts_past_the_committed_offset_is_not_delivered_and_the_partition_is_read_again(
        tmp_path: Path) -> None:
    async def run() -> tuple[list[list[int]], Broker]:
        consumer = _consumer(tmp_path)
        broker = Broker(consumer)
        _seeked_to(consumer, 3349)
        # What the crash-recovery runs with the state deleted showed: a fetch issued before the seek, answered after it.
        broker.fetches = [[3384, 3385, 3386], [3349, 3350], [3351]]
        return [await _delivered(consumer) for _ in range(3)], broker

    delivered, broker = asyncio.run(run())
    assert delivered == [[], [3349, 3350], [3351]]
    assert broker.seeks == [(P0, 3349)] and broker.holes == ["reseeked"]


def test_a_hole_the_log_no_longer_has_is_committed_over(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], Broker, int | None]:
        consumer = _consumer(tmp_path)
        broker = Broker(consumer, log_start=500)  # retention deleted everything before 500
        _seeked_to(consumer, 100)
        broker.fetches = [[500, 501]]
        delivered = await _delivered(consumer)
        for offset in delivered:
            consumer._acked[P0].append(offset)
        return delivered, broker, consumer._new_offset(P0)

    delivered, broker, commit = asyncio.run(run())
    assert delivered == [500, 501] and broker.seeks == [] and broker.holes == ["accepted"]
    assert commit == 502


def test_no_commit_passes_the_record_at_the_committed_offset(tmp_path: Path) -> None:
    consumer = _consumer(tmp_path)
    consumer._committed_offset[P0] = 31
    consumer._acked[P0].extend([32, 33])  # 31 itself is not done (faust 0.15.3 would commit 34)
    assert consumer._new_offset(P0) is None
    consumer._acked[P0].append(31)
    assert consumer._new_offset(P0) == 34


def test_faust_gaps_are_not_counted_as_acknowledged(tmp_path: Path) -> None:
    consumer = _consumer(tmp_path)
    consumer._committed_offset[P0] = 10
    asyncio.run(consumer._add_gap(P0, 11, 20))
    consumer._acked[P0].extend([20, 21])
    assert consumer._new_offset(P0) is None


def test_a_partition_never_committed_starts_at_the_log_start(tmp_path: Path) -> None:
    """Seen after a SIGKILL before the worker's first commit on an internal topic: records
    fetched before the seek were lost on the way to the agent, and the next fetch went on
    after them."""
    async def run() -> tuple[list[list[int]], Broker]:
        consumer = _consumer(tmp_path)
        broker = Broker(consumer, log_start=0)

        async def no_commits() -> dict[TP, int | None]:
            return {P0: None}
        consumer.seek_to_committed = no_commits  # type: ignore[method-assign]
        await consumer.perform_seek()
        broker.fetches = [[9, 10], [0, 1]]
        return [await _delivered(consumer) for _ in range(2)], broker

    delivered, broker = asyncio.run(run())
    assert delivered == [[], [0, 1]] and broker.seeks == [(P0, 0)]


def test_a_hole_that_comes_back_after_every_reread_is_committed_over(tmp_path: Path) -> None:
    """Offsets without records (an upstream transactional producer's markers) must not loop forever."""
    async def run() -> tuple[list[list[int]], Broker]:
        consumer = _consumer(tmp_path)
        broker = Broker(consumer)
        _seeked_to(consumer, 40)
        broker.fetches = [[42, 43]] * (MAX_RESEEKS + 1)
        return [await _delivered(consumer) for _ in range(MAX_RESEEKS + 1)], broker

    delivered, broker = asyncio.run(run())
    assert delivered == [[]] * MAX_RESEEKS + [[42, 43]]
    assert broker.seeks == [(P0, 40)] * MAX_RESEEKS and broker.holes == ["reseeked"] * MAX_RESEEKS + ["accepted"]


def test_a_partition_revoked_meanwhile_is_not_seeked(tmp_path: Path) -> None:
    async def run() -> tuple[list[int], Broker]:
        consumer = _consumer(tmp_path)
        broker = Broker(consumer)
        consumer.assignment = set  # type: ignore[method-assign]  # a rebalance took P0 away
        _seeked_to(consumer, 3349)
        broker.fetches = [[3384, 3385]]
        return await _delivered(consumer), broker

    delivered, broker = asyncio.run(run())
    assert delivered == [] and broker.seeks == []


def test_without_a_log_start_answer_the_hole_is_read_again_not_committed_over(tmp_path: Path) -> None:
    async def run() -> tuple[list[list[int]], Broker]:
        consumer = _consumer(tmp_path)
        broker = Broker(consumer, log_start=500)  # the log start would say "gone": but the broker does not answer

        async def unreachable(*tps: TP) -> dict[TP, int]:
            raise ConnectionError("broker down")
        consumer.earliest_offsets = unreachable  # type: ignore[method-assign]
        _seeked_to(consumer, 100)
        broker.fetches = [[500, 501], [100, 101]]
        return [await _delivered(consumer) for _ in range(2)], broker

    delivered, broker = asyncio.run(run())
    assert delivered == [[], [100, 101]] and broker.seeks == [(P0, 100)] and broker.holes == ["reseeked"]
