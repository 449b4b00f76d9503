"""The current event of an agent's task: where a table write goes.

faust tables pick the changelog partition (and the RocksDB shard) of a write from the
current event of the task that writes. Its own per-event iteration sets it; a batch agent
has to set it for each event of the batch itself, here.
"""

from __future__ import annotations

import weakref
from typing import Any

from faust.streams import _current_event


def enter(event: Any) -> int:
    """Make `event` the current event of this agent's task, as faust's own per-event iteration does.

    Why: in a batch, a table write must go to the partition of the event being processed,
    not of the last one taken. Only the task-local context variable is set, never
    `Stream.current_event`: `take_events` reads that attribute (from the stream's own task)
    to pair each new value with its event, so setting it here paired values with old
    events: events went unacked (commits stalled) and their records were skipped.
    Returns the event's partition.
    """
    _current_event.set(weakref.ref(event))
    return event.message.partition
