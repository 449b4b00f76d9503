"""The processors' faust app and how its topics, agents, timer and pages are declared.

faust picks its transport from the broker URL; `PostbackApp._new_transport` returns the
aiokafka transport with `ContiguousConsumer`, which reads with the app's fetch wait
(default 100 ms, not faust's hard-coded 1.5 s), never delivers a stream partition's
records with a hole and never commits past an unprocessed record. See there why.
Building a `PostbackApp` first verifies the faust/aiokafka internals the runtime uses
(`processors.runtime.compat`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from postback.config import ProcessOptions
from processors.runtime import compat
from processors.runtime.checkpoint import Checkpoint
from processors.runtime.consumer import ContiguousConsumer

log = logging.getLogger("processors")

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
        compat.check_installed()
        super().__init__(*args, **kwargs)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.on_stream_hole = on_stream_hole

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(","))


def new_app(app_id: str, bootstrap: str, opts: ProcessOptions, data_dir: Path, web_port: int,
            on_stream_hole: Callable[[str], None]) -> PostbackApp:
    """The processor's app; every worker of one deployment uses the same app id (consumer group).

    at-least-once (faust's exactly-once mode is not used); RocksDB tables in `data_dir`;
    faust's web server on 127.0.0.1:`web_port` (not 0.0.0.0:6066 in every process)."""
    return PostbackApp(
        app_id,
        broker=broker_url(bootstrap),
        store="rocksdb://",
        datadir=str(data_dir),
        topic_partitions=opts.partitions,
        topic_replication_factor=opts.replication_factor,
        processing_guarantee="at_least_once",
        broker_commit_interval=opts.commit_interval_s,
        broker_session_timeout=opts.session_timeout_s,
        broker_heartbeat_interval=max(1.0, opts.session_timeout_s / 4),
        web_bind="127.0.0.1",
        web_port=web_port,
        web_enabled=True,
        producer_acks=-1,
        producer_linger_ms=5,  # faust's own producer only sends the ticks
        table_cleanup_interval=3600.0,
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        on_stream_hole=on_stream_hole,
    )


def raw_topic(app: faust.App, name: str, partitions: int | None = None) -> faust.TopicT:
    """A topic of raw bytes (keys and values as Kafka holds them); with `partitions`, an
    internal topic of the app, created by faust with that many partitions."""
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                     partitions=partitions, internal=partitions is not None)


def add_agent(app: faust.App, name: str, topic: faust.TopicT, run: Callable[[Any], Awaitable[None]]) -> None:
    """An agent `name` on `topic`: `run(stream)` for as long as the worker runs."""
    async def agent(stream: Any) -> None:
        await run(stream)

    app.agent(topic, name=name)(agent)


def add_ticks(app: faust.App, topics: Iterable[faust.TopicT], key: bytes, partitions: int,
              interval_s: float = 1.0) -> None:
    """Every `interval_s`, on the leader only, one record (`key`, empty value) to every partition
    of each topic, in order: work driven by time (expiry, late clicks) runs on these, in the
    partitions' own streams, so its table writes are ordered with, and replayed like, the
    records around them."""
    targets = list(topics)

    async def ticks() -> None:
        for topic in targets:
            for partition in range(partitions):
                await topic.send(key=key, value=b"", partition=partition)

    app.timer(interval=interval_s, on_leader=True, name="processors.app.ticks")(ticks)


def add_page(app: faust.App, path: str, render: Callable[[], bytes], content_type: str) -> None:
    """`GET path` on the worker's web port answers `render()`."""
    async def page(view: Any, _request: Any) -> Any:
        # As a header: aiohttp refuses a content_type argument with parameters (charset, version).
        return view.bytes(render(), headers={"Content-Type": content_type})

    app.page(path)(page)


def attach_checkpoint(app: faust.App, checkpoint: Checkpoint, revoke_wait_s: float) -> None:
    """A rebalance waits (at most `revoke_wait_s`) for the batches in flight to commit before
    the partitions move; shutting down closes the checkpoint's publisher."""
    @app.on_partitions_revoked.connect
    async def finish_batches(_app: Any, *_args: Any, **_kwargs: Any) -> None:
        if not await checkpoint.finish_batches(revoke_wait_s):
            log.warning("rebalance: %d batch(es) still in flight after %.1f s; revoking anyway",
                        checkpoint.in_flight.running, revoke_wait_s)

    @app.on_before_shutdown.connect
    async def close_publisher(_app: Any, **_kwargs: Any) -> None:
        await checkpoint.close()
