"""The faust-streaming application: topics, RocksDB tables and agents around `processors.stages`.

Design (see docs/architecture.md):

- Stage 1 `verify` consumes raw-postbacks (keyed by the order at ingest, so an order's
  updates are verified in the order received) and either rejects or forwards to the
  internal *dedupe* topic, on the partition of the dedupe key, so that every repeat of
  an order meets its first occurrence on one partition and table shard.
- Stage 2 `dedupe` keeps the `dedupe` table (retries, orders, one-time events) and
  forwards new conversions and updates to the internal *attribute* topic, on the
  partition of the click_id.
- Stage 3 `attribute` joins with the `clicks` table, filled by the `clicks` agent from
  the clicks topic. Both topics are partitioned by click_id with Java's murmur2 and have
  the same partition count, so faust assigns partition N of both to one worker: a table
  join instead of faust's (broken) stream-stream join. Conversions whose click is not
  there yet wait in the `pending` table; ticks sent to every partition expire them.

Batches: each agent takes up to `batch_max` events at a time (`take_events`; the envelope
agents dedupe and attribute up to `envelope_batch_max` envelopes), runs the
pure stages on each with that event set as faust's current event (table writes go to
the event's partition), and hands the batch's table changelog records (`processors.tables`)
and outputs to `processors.publish`: one confluent-kafka producer, internal hops as one
envelope per partition. See there why.

Guarantees: at-least-once (faust's exactly-once mode is not used), every step idempotent:
reprocessing a receipt yields the same output record (see `processors.dedupe`). A batch's
changelog records and outputs are acknowledged by Kafka before faust acks its events, so a
committed input always has its state change and its outputs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faust
from faust.streams import _current_event

from postback.config import ProcessOptions, Settings
from postback.kafka import AsyncProducer, producer_config
from postback.partners import DEFAULT_DEDUPE_HORIZON_DAYS, PartnerConfig
from postback.topics import Topics, TopicSpec
from processors import stages
from processors.faust_app import PostbackApp
from processors.inflight import InFlight
from processors.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from processors.metrics import ProcessorMetrics
from processors.pending_index import PendingIndex
from processors.publish import Publisher, decode_envelope
from processors.sweep import Sweep
from processors.tables import batch_table
from schemas.codec import Codec, CodecError

log = logging.getLogger("processors")

TICK = b"__tick__"
#: Pending entries visited per tick of a partition at most (the rest on the next ticks, a second apart).
PENDING_VISITS_PER_TICK = 5_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _event_id(event: Any) -> str:
    """Where an event sits in Kafka: replaying it yields the same id (see stages._release)."""
    message = event.message
    return f"{message.topic}:{message.partition}:{message.offset}"


def _batches(stream: Any, batch_max: int, opts: ProcessOptions) -> Any:
    return stream.take_events(batch_max, within=opts.batch_wait_s)


def _enter(event: Any) -> int:
    """Make `event` the current event of this agent's task, as faust's own per-event iteration does.

    Why: faust tables pick the changelog partition (and the RocksDB shard) of a write from
    the current event; in a batch that must be the event being processed, not the last
    one taken. Only the task-local context variable is set, never `Stream.current_event`:
    `take_events` reads that attribute (from the stream's own task) to pair each new value
    with its event, so setting it here paired values with old events: events went unacked
    (commits stalled) and their records were skipped. Returns the event's partition.
    """
    _current_event.set(weakref.ref(event))
    return event.message.partition


def broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(","))


TABLES = ("dedupe", "clicks", "pending")


def app_id(settings: Settings) -> str:
    return Topics(settings.topic_prefix).processor_group


def changelog_topics(settings: Settings, opts: ProcessOptions) -> list[TopicSpec]:
    """The tables' changelog topics (compacted), named as faust names them.

    Created before a worker starts: faust declares them itself too, but a worker whose
    first table write races that declaration crashes with `PartitionsMismatch`.
    """
    return [TopicSpec(f"{app_id(settings)}-{table}-changelog", "table key", opts.partitions, "internal-json",
                      compacted=True, retention_ms=None) for table in TABLES]


def create_app(settings: Settings, bootstrap: str, partners: PartnerConfig, opts: ProcessOptions,
               data_dir: Path, worker_index: int = 0) -> faust.App:
    """Build the processor app; every worker of one deployment uses the same app id (consumer group)."""
    topics = Topics(settings.topic_prefix)
    metrics = ProcessorMetrics()
    app = PostbackApp(
        app_id(settings),
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
        web_port=opts.web_port + worker_index,
        web_enabled=True,
        producer_acks=-1,
        producer_linger_ms=5,  # faust's own producer only sends the ticks
        table_cleanup_interval=3600.0,
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        on_stream_hole=lambda outcome: metrics.stream_holes.labels(outcome).inc(),
    )
    raw_codec = Codec.for_record("RawPostback")
    click_codec = Codec.for_record("Click")

    def raw_topic(name: str, internal: bool = False) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=opts.partitions if internal else None, internal=internal)

    raw_in = raw_topic(topics.raw_postbacks.name)
    clicks_in = raw_topic(topics.clicks.name)
    dedupe_topic = raw_topic(topics.processor_dedupe.name, internal=True)
    attribute_topic = raw_topic(topics.processor_attribute.name, internal=True)

    by_name = {name: batch_table(app, name, opts.partitions) for name in TABLES}
    dedupe_table, clicks_table, pending_table = by_name["dedupe"], by_name["clicks"], by_name["pending"]
    tables = {table.changelog_topic.get_topic_name(): table for table in by_name.values()}  # by changelog topic
    wait_ms = int(opts.late_click_wait_s * 1000)
    cleanup_ms = int(opts.cleanup_interval_s * 1000)
    dedupe_sweep = Sweep(dedupe_table.partition_items, opts.cleanup_chunk, cleanup_ms)
    clicks_sweep = Sweep(clicks_table.partition_items, opts.cleanup_chunk, cleanup_ms)
    click_horizon_ms = opts.click_horizon_ms(partners.longest_attribution_window_days())
    pending_index = PendingIndex()  # use through pending_index.follow(app.consumer.seeks)
    publishers: list[Publisher] = []  # one, made on the worker's event loop when the first batch arrives

    def publisher() -> Publisher:
        if not publishers:
            # linger 1 ms: outputs already leave in whole batches; lingering only adds latency to each hop.
            config = producer_config(bootstrap, delivery_timeout_s=opts.delivery_timeout_s, **{"linger.ms": 1})
            producer = AsyncProducer(config, asyncio.get_running_loop())
            publishers.append(Publisher(
                metrics.publish_failures.inc,
                producer,
                {"conversion": topics.conversions.name, "rejection": topics.rejections.name,
                 "duplicate": topics.duplicates.name},
                {"dedupe": topics.processor_dedupe.name, "attribute": topics.processor_attribute.name},
                opts.partitions))
        return publishers[0]

    async def publish(agent: str, events: int, outputs: list[stages.Output]) -> None:
        """The batch's table changes and outputs, acknowledged before the batch's events are acked."""
        changelog = [record for table in tables.values() for record in table.take_changelog()]
        metrics.batch(agent, events, (out.kind for out in outputs), len(changelog))
        if not outputs and not changelog:
            return
        started = time.monotonic()
        acked = await publisher().publish(outputs, stopping=lambda: app.should_stop, changelog=changelog)
        metrics.publish_seconds.observe(time.monotonic() - started)
        for (topic, partition), offset in acked.items():
            tables[topic].changelog_acked(partition, offset)

    @app.page("/metrics")
    async def metrics_page(view: Any, _request: Any) -> Any:
        # As a header: aiohttp refuses a content_type argument with parameters (charset, version).
        return view.bytes(metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    in_flight = InFlight()

    @app.on_partitions_revoked.connect
    async def finish_batches(_app: Any, *_args: Any, **_kwargs: Any) -> None:
        """Let batches in flight publish their changelog and outputs before the partitions move."""
        if not await in_flight.idle(opts.session_timeout_s / 2):
            log.warning("rebalance: %d batch(es) still in flight after %.1f s; revoking anyway",
                        in_flight.running, opts.session_timeout_s / 2)

    @app.on_before_shutdown.connect
    async def close_publisher(_app: Any, **_kwargs: Any) -> None:
        if publishers:
            await publishers[0].close()

    async def run_batches(agent: str, stream: Any, handle: Callable[[Any, int, int], Iterable[stages.Output]],
                          batch_max: int = opts.batch_max) -> None:
        """Take events in batches, `handle(event, partition, now_ms)` each as faust's current
        event, then publish the batch's outputs; faust acks the batch once this loop asks for the next.

        An exception here is a bug or a lost broker, never bad input (undecodable records are
        skipped). faust would log the agent as crashed and keep the worker alive, consuming
        nothing: instead the worker exits, loudly, and its supervisor restarts it; the
        unacked batch is processed again.
        """
        last: dict[Any, int] = {}  # partition -> offset of its last event here, since the last rebalance
        seeks = app.consumer.seeks
        try:
            async for events in _batches(stream, batch_max, opts):
                outputs: list[stages.Output] = []
                now = _now_ms()
                if app.consumer.seeks != seeks:  # a rebalance: partitions may have moved on elsewhere
                    last.clear()
                    seeks = app.consumer.seeks
                with in_flight:  # a rebalance waits for this batch (see processors.inflight)
                    for event in events:
                        message = event.message
                        before = last.get(message.tp)
                        if before is not None and message.offset > before + 1:
                            metrics.stream_holes.labels("agent").inc()
                            log.warning("agent %s: %s jumped from offset %d to %d", agent, message.tp, before,
                                        message.offset)
                        last[message.tp] = message.offset
                        outputs.extend(handle(event, _enter(event), now))
                    await publish(agent, len(events), outputs)
        except asyncio.CancelledError:
            raise
        except Exception:
            if app.should_stop:
                raise
            log.critical("agent %s failed; exiting so that the worker is restarted", stream, exc_info=True)
            logging.shutdown()
            os._exit(70)

    def decoded(codec: Codec, event: Any) -> dict[str, Any] | None:
        try:
            return codec.decode(event.value)
        except CodecError as exc:  # not written by our ingester: no receipt to answer for
            log.error("skipping an undecodable %s at %s: %s", codec.name, _event_id(event), exc)
            metrics.skipped.labels(event.message.topic).inc()
            return None

    def verify_one(event: Any, _partition: int, now: int) -> list[stages.Output]:
        raw = decoded(raw_codec, event)
        return [] if raw is None else [stages.verify(raw, partners, now)]

    def dedupe_one(event: Any, partition: int, now: int) -> Iterable[stages.Output]:
        if event.key == TICK:
            removed = stages.expire_dedupe(dedupe_sweep.next_chunk(partition, now), dedupe_table, now,
                                           default_horizon_ms=DEFAULT_DEDUPE_HORIZON_DAYS * 86_400_000)
            if removed:
                metrics.expired.labels("dedupe").inc(removed)
                log.info("expired %d dedupe entries on partition %d", removed, partition)
            return []
        return [stages.dedupe(msg, dedupe_table, partition, now) for msg in decode_envelope(event.value)]

    def attribute_one(event: Any, partition: int, now: int) -> Iterable[stages.Output]:
        if event.key == TICK:
            removed = stages.expire_clicks(clicks_sweep.next_chunk(partition, now), clicks_table, now,
                                           click_horizon_ms)
            if removed:
                metrics.expired.labels("clicks").inc(removed)
                log.info("forgot %d clicks older than the click horizon on partition %d", removed, partition)
            return expire_pending(partition, now, _event_id(event))
        outputs: list[stages.Output] = []
        for conversion in decode_envelope(event.value):
            attributed = stages.attribute_conversion(conversion, clicks_table, pending_table, partition, partners,
                                                     now, wait_ms)
            index = pending_index.follow(app.consumer.seeks)
            if not attributed and index.built(partition):  # waits for its click
                click_id = conversion["click_id"]
                index.schedule(partition, click_id, stages.next_visit_ms(pending_table.get(click_id)))
            outputs.extend(attributed)
        return outputs

    def expire_pending(partition: int, now: int, event_id: str) -> list[stages.Output]:
        # After a rebalance every partition is rebuilt from its table on its next tick
        # (entries parked meanwhile are in the table).
        index = pending_index.follow(app.consumer.seeks)
        if not index.built(partition):
            index.rebuild(partition, pending_table.partition_items(partition)[0], now)
        visit = [(click_id, waiting) for click_id in index.due(partition, now, PENDING_VISITS_PER_TICK)
                 if (waiting := pending_table.get(click_id)) is not None]
        outputs, after = stages.expire_pending(visit, pending_table, partners, now, event_id)
        for click_id, waiting in after.items():
            index.schedule(partition, click_id, stages.next_visit_ms(waiting))
        return outputs

    def click_one(event: Any, _partition: int, now: int) -> Iterable[stages.Output]:
        click = decoded(click_codec, event)
        return [] if click is None else stages.click_arrived(click, clicks_table, pending_table, partners, now,
                                                             _event_id(event))

    @app.agent(raw_in)
    async def verify(stream: Any) -> None:
        await run_batches("verify", stream, verify_one)

    @app.agent(dedupe_topic)
    async def dedupe(stream: Any) -> None:
        await run_batches("dedupe", stream, dedupe_one, opts.envelope_batch_max)

    @app.agent(attribute_topic)
    async def attribute(stream: Any) -> None:
        await run_batches("attribute", stream, attribute_one, opts.envelope_batch_max)

    @app.agent(clicks_in)
    async def clicks(stream: Any) -> None:
        await run_batches("clicks", stream, click_one)

    async def tick(topic: faust.TopicT) -> None:
        for partition in range(opts.partitions):
            await topic.send(key=TICK, value=b"", partition=partition)

    @app.timer(interval=1.0, on_leader=True)
    async def ticks() -> None:
        """Late clicks and expiry run on ticks in the partitions' own streams, so that their
        table writes are ordered with, and replayed like, the records around them."""
        await tick(attribute_topic)
        await tick(dedupe_topic)

    return app
