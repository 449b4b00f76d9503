"""`processors.runtime.batches.run_batches`: each event handled as the current event, the
batch committed before the next is taken, a lost offset reported, a failure ends the worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from processors.runtime import batches
from processors.stages import Output


class Event:
    def __init__(self, partition: int, offset: int) -> None:
        self.message = SimpleNamespace(topic="t", partition=partition, offset=offset, tp=("t", partition))


class Stream:
    """`take_events` as faust's: yields each batch; records when the loop asked for the next."""

    def __init__(self, *batches_: list[Event]) -> None:
        self.batches = list(batches_)
        self.log: list[str] = []

    async def take_events(self, max_: int, within: float) -> AsyncIterator[list[Event]]:
        for batch in self.batches:
            yield batch
            self.log.append(f"ack {len(batch)}")  # faust acks a batch when the loop asks for the next


class Checkpoint:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.in_flight = 0

    def batch(self) -> "Checkpoint":
        return self

    def __enter__(self) -> None:
        self.in_flight += 1

    def __exit__(self, *_exc: Any) -> None:
        self.in_flight -= 1

    async def commit(self, agent: str, events: int, outputs: list[Output]) -> None:
        assert self.in_flight == 1
        self.log.append(f"commit {agent} {events} {[o.key for o in outputs]}")


def _app(should_stop: bool = False) -> Any:
    return SimpleNamespace(consumer=SimpleNamespace(seeks=1), should_stop=should_stop)


def test_each_event_is_handled_on_its_partition_and_the_batch_committed_before_it_is_acked() -> None:
    stream = Stream([Event(0, 5), Event(2, 7)], [Event(0, 6)])
    holes: list[int] = []

    def handle(event: Event, partition: int, now: int) -> list[Output]:
        assert partition == event.message.partition and now > 0
        stream.log.append(f"handle {partition}:{event.message.offset}")
        return [Output("conversion", f"{partition}:{event.message.offset}", {})]

    checkpoint: Any = Checkpoint(stream.log)
    asyncio.run(batches.run_batches(_app(), "verify", stream, handle, checkpoint, 100, 0.1,
                                    on_hole=lambda: holes.append(1)))
    assert stream.log == ["handle 0:5", "handle 2:7", "commit verify 2 ['0:5', '2:7']", "ack 2",
                          "handle 0:6", "commit verify 1 ['0:6']", "ack 1"]
    assert holes == []


def test_an_offset_jump_within_a_partition_is_reported() -> None:
    stream = Stream([Event(0, 5)], [Event(0, 9)])
    holes: list[int] = []
    checkpoint: Any = Checkpoint(stream.log)
    asyncio.run(batches.run_batches(_app(), "verify", stream, lambda *_: [], checkpoint, 100, 0.1,
                                    on_hole=lambda: holes.append(1)))
    assert holes == [1]


def test_a_failing_handler_ends_the_worker_without_committing(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[str] = []

    class Exited(Exception):
        pass

    def exit_for_restart() -> None:
        exits.append("exit")
        raise Exited

    def handle(*_: Any) -> list[Output]:
        raise ValueError("a bug")

    monkeypatch.setattr(batches, "exit_for_restart", exit_for_restart)
    stream = Stream([Event(0, 5)])
    checkpoint: Any = Checkpoint(stream.log)
    with pytest.raises(Exited):
        asyncio.run(batches.run_batches(_app(), "verify", stream, handle, checkpoint, 100, 0.1, on_hole=lambda: None))
    assert exits == ["exit"] and not any(entry.startswith("commit") for entry in stream.log)


def test_a_failure_while_stopping_is_raised_not_exited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches, "exit_for_restart", lambda: pytest.fail("exited while stopping"))

    def handle(*_: Any) -> list[Output]:
        raise ValueError("publish gave up")

    stream = Stream([Event(0, 5)])
    checkpoint: Any = Checkpoint(stream.log)
    with pytest.raises(ValueError):
        asyncio.run(batches.run_batches(_app(should_stop=True), "verify", stream, handle, checkpoint, 100, 0.1,
                                        on_hole=lambda: None))
