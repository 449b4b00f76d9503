"""The batch loop every agent runs: take events, handle each as the current event, commit.

Why batches: faust's per-event cost is paid once per batch for acks and publishing (see
`processors.runtime.publish`). Each agent takes up to `batch_max` events at a time
(`take_events`), runs its handler on each with that event as faust's current event (table
writes go to the event's partition, `processors.runtime.context`), then hands the batch's
outputs to `Checkpoint.commit`. faust acks the batch once this loop asks for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from processors.runtime.app import PostbackApp
from processors.runtime.checkpoint import Checkpoint
from processors.runtime.context import enter
from processors.runtime.worker import exit_for_restart
from processors.stages import Output

log = logging.getLogger("processors")

#: `handle(event, partition, now_ms)`: the outputs of one event.
Handler = Callable[[Any, int, int], Iterable[Output]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def run_batches(app: PostbackApp, agent: str, stream: Any, handle: Handler, checkpoint: Checkpoint,
                      batch_max: int, within_s: float, on_hole: Callable[[], None]) -> None:
    """Take events in batches of at most `batch_max` (or what arrived within `within_s`),
    `handle` each as faust's current event, then `checkpoint.commit` the batch.

    Guarantees: a batch's events are acked only after its commit returned; an offset that
    jumps within a partition (a record faust lost) is logged and `on_hole()` reported.

    An exception here is a bug or a lost broker, never bad input (handlers skip undecodable
    records). faust would log the agent as crashed and keep the worker alive, consuming
    nothing: instead the worker exits, loudly (`exit_for_restart`), and its supervisor
    restarts it; the unacked batch is processed again.
    """
    last: dict[Any, int] = {}  # partition -> offset of its last event here, since the last rebalance
    seeks = app.consumer.seeks
    try:
        async for events in stream.take_events(batch_max, within=within_s):
            outputs: list[Output] = []
            now = _now_ms()
            if app.consumer.seeks != seeks:  # a rebalance: partitions may have moved on elsewhere
                last.clear()
                seeks = app.consumer.seeks
            with checkpoint.batch():  # a rebalance waits for this batch (see processors.runtime.inflight)
                for event in events:
                    message = event.message
                    before = last.get(message.tp)
                    if before is not None and message.offset > before + 1:
                        on_hole()
                        log.warning("agent %s: %s jumped from offset %d to %d", agent, message.tp, before,
                                    message.offset)
                    last[message.tp] = message.offset
                    outputs.extend(handle(event, enter(event), now))
                await checkpoint.commit(agent, len(events), outputs)
    except asyncio.CancelledError:
        raise
    except Exception:
        if app.should_stop:
            raise
        log.critical("agent %s failed; exiting so that the worker is restarted", stream, exc_info=True)
        exit_for_restart()
