"""`processors.runtime.checkpoint.Checkpoint`: a batch may be acked only once its changelog
and outputs are acknowledged, and the tables' persisted offsets follow the acknowledgements."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from postback.kafka import KafkaUnavailable
from processors.metrics import ProcessorMetrics
from processors.runtime.checkpoint import Checkpoint
from processors.stages import Output

Record = tuple[str, bytes | None, bytes | None, int]


class Table:
    """A BatchTable's part in a commit: its queued changelog and its persisted offsets."""

    def __init__(self, topic: str, queued: list[Record], log: list[str]) -> None:
        self.changelog_topic = self
        self._topic = topic
        self.queued = queued
        self.persisted: dict[int, int] = {}
        self._log = log

    def get_topic_name(self) -> str:
        return self._topic

    def take_changelog(self) -> list[Record]:
        self._log.append(f"take {self._topic}")
        records, self.queued = self.queued, []
        return records

    def changelog_acked(self, partition: int, offset: int) -> None:
        self._log.append(f"persist {self._topic}:{partition}@{offset}")
        self.persisted[partition] = offset


class Publisher:
    """Acknowledges each changelog record at offset 100 + its index; or fails."""

    def __init__(self, log: list[str], fails: bool = False) -> None:
        self.log = log
        self.fails = fails
        self.sent: list[Any] = []
        self.closed = False

    async def publish(self, outputs: list[Output], stopping: Callable[[], bool] = lambda: False,
                      changelog: Sequence[Record] = ()) -> dict[tuple[str, int], int]:
        self.log.append("publish")
        if self.fails:
            raise KafkaUnavailable("timeout", "the worker is stopping")
        self.sent.extend([*changelog, *outputs])
        acked: dict[tuple[str, int], int] = {}
        for index, (topic, _key, _value, partition) in enumerate(changelog):
            acked[(topic, partition)] = 100 + index
        return acked

    async def close(self) -> None:
        self.closed = True


def _checkpoint(log: list[str], publisher: Publisher) -> tuple[Checkpoint, Table, Table, list[Publisher]]:
    dedupe = Table("dedupe-changelog", [("dedupe-changelog", b"k1", b"v", 0), ("dedupe-changelog", b"k2", None, 3)],
                   log)
    clicks = Table("clicks-changelog", [("clicks-changelog", b"c", b"v", 3)], log)
    made: list[Publisher] = []

    def make() -> Publisher:
        made.append(publisher)
        return publisher

    tables: Any = [dedupe, clicks]
    return Checkpoint(tables, make, ProcessorMetrics(), lambda: False), dedupe, clicks, made


OUT = Output("conversion", "C1", {"receipt_id": "R1"})


def test_changelog_first_then_outputs_acknowledged_then_offsets_persisted() -> None:
    log: list[str] = []
    publisher = Publisher(log)
    checkpoint, dedupe, clicks, _ = _checkpoint(log, publisher)
    asyncio.run(checkpoint.commit("dedupe", 2, [OUT]))
    assert log == ["take dedupe-changelog", "take clicks-changelog", "publish", "persist dedupe-changelog:0@100",
                   "persist dedupe-changelog:3@101", "persist clicks-changelog:3@102"]
    assert publisher.sent == [("dedupe-changelog", b"k1", b"v", 0), ("dedupe-changelog", b"k2", None, 3),
                              ("clicks-changelog", b"c", b"v", 3), OUT]
    assert dedupe.persisted == {0: 100, 3: 101} and clicks.persisted == {3: 102}
    assert dedupe.queued == [] and clicks.queued == []


def test_a_failed_publish_persists_nothing_and_raises() -> None:
    log: list[str] = []
    checkpoint, dedupe, _, _ = _checkpoint(log, Publisher(log, fails=True))
    with pytest.raises(KafkaUnavailable):
        asyncio.run(checkpoint.commit("dedupe", 2, [OUT]))
    assert dedupe.persisted == {} and not any(entry.startswith("persist") for entry in log)


def test_an_empty_batch_publishes_nothing_and_makes_no_publisher() -> None:
    log: list[str] = []
    checkpoint, dedupe, clicks, made = _checkpoint(log, Publisher(log))
    dedupe.queued, clicks.queued = [], []
    asyncio.run(checkpoint.commit("verify", 5, []))
    asyncio.run(checkpoint.close())
    assert "publish" not in log and made == []


def test_one_publisher_made_on_first_use_and_closed() -> None:
    log: list[str] = []
    publisher = Publisher(log)
    checkpoint, _, _, made = _checkpoint(log, publisher)

    async def run() -> None:
        await checkpoint.commit("verify", 1, [OUT])
        await checkpoint.commit("verify", 1, [OUT])
        await checkpoint.close()

    asyncio.run(run())
    assert made == [publisher] and publisher.closed


def test_a_rebalance_waits_for_the_batch_in_flight() -> None:
    async def run() -> tuple[bool, bool]:
        log: list[str] = []
        checkpoint, _, _, _ = _checkpoint(log, Publisher(log))
        with checkpoint.batch():
            busy = await checkpoint.finish_batches(0.01)
        return busy, await checkpoint.finish_batches(0.01)

    assert asyncio.run(run()) == (False, True)
