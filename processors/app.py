"""The processor app: three stages over Kafka topics and RocksDB tables, assembled.

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
- Stage 4 `commission` gets every conversion on the internal *commission* topic, on the
  partition of its advertiser, and computes the affiliate's payout (`processors.commission`)
  against the `commission` table: caps, tiers, quality holds, clawbacks and FX. All of an
  advertiser's conversions (so all of each of its offers', and each of its orders')
  meet on one partition, so a cap of N lets exactly N through however many workers run. FX rates come from the fx-rates topic, which every worker reads whole
  (`processors.fx_feed`).

What each agent does with an event is `processors.handlers.StageHandlers`; batches, the
tables' changelog, publishing and the commit order are the runtime's (`processors.runtime`,
the only package that knows faust and its Kafka client; `processors.runtime.checkpoint`
states the order). Guarantees: at-least-once, every step idempotent: reprocessing a receipt yields the
same output record (see `processors.dedupe`); a committed input always has its state
change and its outputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from postback.config import ProcessOptions, Settings
from postback.kafka import AsyncProducer, producer_config
from postback.partners import PartnerConfig
from postback.topics import Topics, TopicSpec
from postback.fx import FxRates
from processors.handlers import TICK, StageHandlers
from processors.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from processors.metrics import ProcessorMetrics
from processors.runtime.app import (PostbackApp, add_agent, add_page, add_ticks, attach_checkpoint, broker_url,
                                    new_app, raw_topic)
from processors.runtime.batches import Handler, run_batches
from processors.runtime.checkpoint import Checkpoint
from processors.runtime.publish import Publisher
from processors.runtime.tables import batch_table

__all__ = ["TABLES", "app_id", "broker_url", "changelog_topics", "create_app"]

TABLES = ("dedupe", "clicks", "pending", "commission")


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
               data_dir: Path, worker_index: int = 0, fx_rates: FxRates | None = None) -> PostbackApp:
    """Build the processor app; every worker of one deployment uses the same app id (consumer group).

    No I/O here. `fx_rates` is the worker's FX feed (`processors.fx_feed`, started by the
    worker before the app); without one, every non-reporting currency is `fx_missing`.
    """
    topics = Topics(settings.topic_prefix)
    metrics = ProcessorMetrics()
    app = new_app(app_id(settings), bootstrap, opts, data_dir, opts.web_port + worker_index,
                  on_stream_hole=lambda outcome: metrics.stream_holes.labels(outcome).inc())
    raw_in = raw_topic(app, topics.raw_postbacks.name)
    clicks_in = raw_topic(app, topics.clicks.name)
    dedupe_topic = raw_topic(app, topics.processor_dedupe.name, opts.partitions)
    attribute_topic = raw_topic(app, topics.processor_attribute.name, opts.partitions)
    commission_topic = raw_topic(app, topics.processor_commission.name, opts.partitions)
    tables = {name: batch_table(app, name, opts.partitions) for name in TABLES}
    handlers = StageHandlers(partners, opts, tables["dedupe"], tables["clicks"], tables["pending"], metrics,
                             rebalances=lambda: app.consumer.seeks, commission_table=tables["commission"],
                             fx=fx_rates)
    checkpoint = Checkpoint(tables.values(), _publisher_factory(bootstrap, topics, opts, metrics), metrics,
                            stopping=lambda: app.should_stop)

    add_page(app, "/metrics", metrics.render, METRICS_CONTENT_TYPE)
    attach_checkpoint(app, checkpoint, revoke_wait_s=opts.session_timeout_s / 2)

    def agent(name: str, handle: Handler, batch_max: int) -> Callable[[Any], Any]:
        return lambda stream: run_batches(app, name, stream, handle, checkpoint, batch_max, opts.batch_wait_s,
                                          on_hole=lambda: metrics.stream_holes.labels("agent").inc())

    # Envelope agents take fewer events per batch: each holds many messages.
    add_agent(app, "processors.app.verify", raw_in, agent("verify", handlers.verify, opts.batch_max))
    add_agent(app, "processors.app.dedupe", dedupe_topic,
              agent("dedupe", handlers.dedupe, opts.envelope_batch_max))
    add_agent(app, "processors.app.attribute", attribute_topic,
              agent("attribute", handlers.attribute, opts.envelope_batch_max))
    add_agent(app, "processors.app.clicks", clicks_in, agent("clicks", handlers.clicks, opts.batch_max))
    add_agent(app, "processors.app.commission", commission_topic,
              agent("commission", handlers.commission, opts.envelope_batch_max))
    add_ticks(app, [attribute_topic, dedupe_topic], TICK, opts.partitions)
    return app


def _publisher_factory(bootstrap: str, topics: Topics, opts: ProcessOptions,
                       metrics: ProcessorMetrics) -> Callable[[], Publisher]:
    """Makes the worker's one publisher; called on the worker's event loop by the first batch to publish."""
    def make() -> Publisher:
        # linger 1 ms: outputs already leave in whole batches; lingering only adds latency to each hop.
        config = producer_config(bootstrap, delivery_timeout_s=opts.delivery_timeout_s, **{"linger.ms": 1})
        return Publisher(
            metrics.publish_failures.inc,
            AsyncProducer(config, asyncio.get_running_loop()),
            {"conversion": topics.conversions.name, "rejection": topics.rejections.name,
             "duplicate": topics.duplicates.name},
            {"dedupe": topics.processor_dedupe.name, "attribute": topics.processor_attribute.name,
             "commission": topics.processor_commission.name},
            opts.partitions)

    return make
