"""The processors' faust.App: faust with the consumer of `processors.consumer`.

faust picks its transport from the broker URL; `PostbackApp._new_transport` returns the
aiokafka transport with `ContiguousConsumer`, which reads with the app's fetch wait
(default 100 ms, not faust's hard-coded 1.5 s), never delivers a stream partition's
records with a hole and never commits past an unprocessed record. See there why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from processors.consumer import ContiguousConsumer

#: The broker answers a fetch after at most this long, even with no new records.
FETCH_MAX_WAIT_MS = 100


class _Transport(faust_aiokafka.Transport):
    Consumer = ContiguousConsumer


class PostbackApp(faust.App):
    """faust.App(..., fetch_max_wait_ms=..., on_stream_hole=...) with `ContiguousConsumer`.

    `on_stream_hole(outcome)` is called with "reseeked" or "accepted" each time the
    consumer finds records missing from a stream partition (for metrics).
    """

    def __init__(self, *args: Any, fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
                 on_stream_hole: Callable[[str], None] = lambda _outcome: None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.on_stream_hole = on_stream_hole

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)
