"""The faust-streaming application: topics, RocksDB tables and agents around `processors.stages`.

Design (see docs/architecture.md):

- Stage 1 `verify` consumes raw-postbacks (keyed by click_id) and either rejects or
  forwards to the internal *dedupe* topic keyed by the dedupe key, so that every repeat
  of an order meets its first occurrence on one partition and one table shard.
- Stage 2 `dedupe` keeps the `dedupe` table (retries, orders, one-time events) and
  forwards new conversions and updates to the internal *attribute* topic keyed by click_id.
- Stage 3 `attribute` joins with the `clicks` table, filled by the `clicks` agent from
  the clicks topic. Both topics are keyed by click_id with Java's murmur2 partitioner and
  have the same partition count, so faust assigns partition N of both to one worker:
  a table join instead of faust's (broken) stream-stream join. Conversions whose click is
  not there yet wait in the `pending` table; ticks sent to every partition expire them.

Guarantees: at-least-once (faust's exactly-once mode is not used), every step idempotent:
reprocessing a receipt yields the same output record (see `processors.dedupe`). Outputs
are sent as faust *attachments*: published before the source offset is committed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import faust

from postback.config import ProcessOptions, Settings
from postback.partners import PartnerConfig
from postback.topics import Topics, TopicSpec
from processors import stages
from schemas.codec import Codec

log = logging.getLogger("processors")

TICK = b"__tick__"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _event_id(event: Any) -> str:
    """Where an event sits in Kafka: replaying it yields the same id (see stages._release)."""
    message = event.message
    return f"{message.topic}:{message.partition}:{message.offset}"


def broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{server.strip()}" for server in bootstrap.split(","))


TABLES = ("dedupe", "clicks", "pending")


def app_id(settings: Settings) -> str:
    return f"{settings.topic_prefix}-processor"


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
    app = faust.App(
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
        producer_linger_ms=5,  # let aiokafka batch: one produce request per few records, not one per record
        table_cleanup_interval=3600.0,
        stream_wait_empty=False,
        # Outputs are published as attachments of their source offset: the commit of an
        # event's offset waits until what it emitted is acknowledged, so a crash can never
        # leave a committed input without its output (seen without it: SIGKILL lost sends).
        stream_publish_on_commit=True,
        consumer_auto_offset_reset="earliest",
    )
    raw_codec = Codec.for_record("RawPostback")
    click_codec = Codec.for_record("Click")
    codecs = {"conversion": Codec.for_record("Conversion"), "rejection": Codec.for_record("Rejection"),
              "duplicate": Codec.for_record("Duplicate")}

    def raw_topic(name: str, internal: bool = False) -> faust.TopicT:
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=opts.partitions if internal else None, internal=internal)

    raw_in = raw_topic(topics.raw_postbacks.name)
    clicks_in = raw_topic(topics.clicks.name)
    dedupe_topic = raw_topic(topics.processor_dedupe.name, internal=True)
    attribute_topic = raw_topic(topics.processor_attribute.name, internal=True)
    out_topics = {"conversion": raw_topic(topics.conversions.name), "rejection": raw_topic(topics.rejections.name),
                  "duplicate": raw_topic(topics.duplicates.name), "dedupe": dedupe_topic,
                  "attribute": attribute_topic}

    def table(name: str) -> Any:
        # str keys and dict values: faust picks its json serializer for both.
        return app.Table(name, default=None, partitions=opts.partitions, key_type=str, value_type=None)

    dedupe_table = table("dedupe")
    clicks_table = table("clicks")
    pending_table = table("pending")
    wait_ms = int(opts.late_click_wait_s * 1000)

    async def emit(outputs: list[stages.Output]) -> None:
        for out in outputs:
            value = codecs[out.kind].encode(out.record) if out.kind in codecs else \
                stages.encode_internal(out.record).encode()
            await out_topics[out.kind].send(key=out.key.encode(), value=value)

    @app.agent(raw_in)
    async def verify(stream: Any) -> None:
        async for raw_bytes in stream:
            raw = raw_codec.decode(raw_bytes)
            await emit([stages.verify(raw, partners, _now_ms())])

    @app.agent(dedupe_topic)
    async def dedupe(stream: Any) -> None:
        async for event in stream.events():
            partition = event.message.partition
            if event.key == TICK:
                removed = stages.expire_dedupe(dedupe_table, partition, _now_ms(), horizon_ms=90 * 86_400_000)
                if removed:
                    log.info("expired %d dedupe entries on partition %d", removed, partition)
                continue
            msg = stages.decode_internal(event.value)
            await emit([stages.dedupe(msg, dedupe_table, partition, _now_ms())])

    @app.agent(attribute_topic)
    async def attribute(stream: Any) -> None:
        async for event in stream.events():
            partition = event.message.partition
            if event.key == TICK:
                await emit(stages.expire_pending(pending_table, partition, partners, _now_ms(), _event_id(event)))
                continue
            conversion = stages.decode_internal(event.value)
            await emit(stages.attribute_conversion(conversion, clicks_table, pending_table, partition, partners,
                                                   _now_ms(), wait_ms))

    @app.agent(clicks_in)
    async def clicks(stream: Any) -> None:
        async for event in stream.events():
            click = click_codec.decode(event.value)
            await emit(stages.click_arrived(click, clicks_table, pending_table, partners, _now_ms(),
                                            _event_id(event)))

    async def tick(topic: faust.TopicT) -> None:
        for partition in range(opts.partitions):
            await topic.send(key=TICK, value=b"", partition=partition)

    @app.timer(interval=1.0, on_leader=True)
    async def late_click_ticks() -> None:
        await tick(attribute_topic)

    @app.timer(interval=opts.dedupe_cleanup_interval_s, on_leader=True)
    async def dedupe_cleanup_ticks() -> None:
        await tick(dedupe_topic)

    return app
