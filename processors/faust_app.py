"""faust.App with a consumer that does not sit on idle partitions' fetch wait.

The problem (seen in bench/e2e.py as a steady ~2 s lag at 1,000 postbacks/s with the
worker mostly idle, in some runs and not others): faust creates its aiokafka consumer
with a hard-coded `fetch_max_wait_ms=1500`. aiokafka keeps one fetch request per broker
in flight and leaves out of it the partitions that still hold buffered records. When
such a request contains only idle partitions (a quiet clicks topic, internal topics
between batches), the broker holds it for the full 1.5 s, and the busy partitions wait
behind it. Every hop then adds up to 1.5 s, although records are there.

The fix: this app's consumer asks the broker to answer after at most `fetch_max_wait_ms`
(default 100 ms). Idle fetches cost a few more small requests per second; the busy
partitions' records are fetched as soon as they are consumed.

How: faust picks the transport from the broker URL; `PostbackApp._new_transport` returns
the aiokafka transport with a consumer thread that sets the wait on the aiokafka consumer
after faust built it and before it starts (aiokafka reads it when the consumer starts).
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

#: The broker answers a fetch after at most this long, even with no new records.
FETCH_MAX_WAIT_MS = 100


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # fail loudly if aiokafka's internals moved
            raise RuntimeError("aiokafka's consumer has no _fetch_max_wait_ms: update processors/faust_app.py")
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class PostbackApp(faust.App):
    """faust.App(..., fetch_max_wait_ms=...) whose consumer uses that fetch wait (see above)."""

    def __init__(self, *args: Any, fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)
