"""Kafka topics: names, message keys, partition counts and schemas, in one place.

Every producer, consumer and the local stack take topic names from ``Topics`` so a
prefix (``POSTBACK_TOPIC_PREFIX``) can isolate environments on a shared cluster.
Keys decide ordering and co-partitioning: clicks and raw postbacks are both keyed by
``click_id`` (6 partitions each) so the attribution join finds a click and its
postbacks in the same partition number. Values are Avro single-object encoded with
the named schema (see ``schemas.codec``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

_DAY_MS = 24 * 60 * 60 * 1000
_LEGAL_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME_LEN = 249  # Kafka's limit


@dataclass(frozen=True)
class TopicSpec:
    """One topic. ``key`` describes what the message key holds; ``schema`` names the value's Avro schema.

    ``compacted`` topics keep the latest value per key; ``retention_ms`` None means the
    broker default.
    """

    name: str
    key: str
    partitions: int
    schema: str
    compacted: bool
    retention_ms: int | None

    def config(self) -> dict[str, str]:
        """Topic-level configuration for ``NewTopic``."""
        config = {"cleanup.policy": "compact" if self.compacted else "delete"}
        if self.retention_ms is not None:
            config["retention.ms"] = str(self.retention_ms)
        return config


# attribute: (suffix, key, partitions, schema, compacted, retention_ms)
_LAYOUT: tuple[tuple[str, tuple[str, str, int, str, bool, int | None]], ...] = (
    # Outlives a 30-day attribution window, with slack to rebuild the click store.
    ("clicks", ("clicks", "click_id", 6, "Click", False, 35 * _DAY_MS)),
    # The replayable source of truth for everything downstream.
    # Keyed by the order (postback.partner_view.routing_key) so an order's updates stay in order.
    ("raw_postbacks", ("raw-postbacks", "the order's dedupe key (aliases applied), else receipt_id", 6,
                       "RawPostback", False, 14 * _DAY_MS)),
    # Latest version per conversion_id wins, as in the ReplacingMergeTree sink.
    ("conversions", ("conversions", "conversion_id", 6, "Conversion", True, None)),
    ("rejections", ("rejections", "receipt_id", 3, "Rejection", False, 30 * _DAY_MS)),
    ("duplicates", ("duplicates", "receipt_id", 3, "Duplicate", False, 30 * _DAY_MS)),
    # Consumed by retention systems, one topic per event family, written transactionally
    # by the lifecycle router; keyed by customer so one customer's events stay ordered.
    ("lifecycle_acquisition", ("lifecycle.acquisition", "customer_id, else order_id, else conversion_id", 6,
                               "Conversion", False, None)),
    ("lifecycle_purchase", ("lifecycle.purchase", "customer_id, else order_id, else conversion_id", 6,
                            "Conversion", False, None)),
    ("lifecycle_subscription", ("lifecycle.subscription", "customer_id, else order_id, else conversion_id", 6,
                                "Conversion", False, None)),
    ("lifecycle_reversal", ("lifecycle.reversal", "customer_id, else order_id, else conversion_id", 6,
                            "Conversion", False, None)),
    # Internal to the processors: repartitioning by dedupe key, then by click_id. Each record is
    # an envelope (a JSON array of messages, no key) on the partition murmur2 gives the key
    # named here (processors/runtime/publish.py). Created up front (not by faust), so a worker never
    # starts subscribed to a missing topic.
    ("processor_dedupe", ("processor-dedupe", "partition of the dedupe key", 6, "internal-json", False,
                          7 * _DAY_MS)),
    ("processor_attribute", ("processor-attribute", "partition of the click_id", 6, "internal-json", False,
                             7 * _DAY_MS)),
    # Conversions on their way to the commission engine, by advertiser: all conversions of its offers and
    # orders meet on one partition, which makes caps exact and refunds find their order (processors/handlers.py).
    ("processor_commission", ("processor-commission", "advertiser_id", 6, "internal-json", False,
                              7 * _DAY_MS)),
    # Daily FX rates into the reporting currency; the latest value per currency and day wins.
    ("fx_rates", ("fx-rates", "currency|date", 1, "FxRate", True, None)),
    # Outbound postbacks to affiliates (sinks/outbound/delivery.py): jobs waiting for their next attempt,
    # jobs given up on (with a reason), and one OutboundDelivery record per attempt.
    ("outbound_retry", ("outbound-retry", "endpoint_id", 6, "internal-json", False, 7 * _DAY_MS)),
    ("outbound_dead", ("outbound-dead", "endpoint_id", 3, "internal-json", False, 30 * _DAY_MS)),
    ("outbound_deliveries", ("outbound-deliveries", "conversion_id", 3, "OutboundDelivery", False,
                             30 * _DAY_MS)),
)


@dataclass(frozen=True)
class Topics:
    """All our topics, named ``f"{prefix}.{suffix}"``, e.g. ``Topics().raw_postbacks.name == "postback.raw-postbacks"``."""

    prefix: str = "postback"
    clicks: TopicSpec = field(init=False)
    raw_postbacks: TopicSpec = field(init=False)
    conversions: TopicSpec = field(init=False)
    rejections: TopicSpec = field(init=False)
    duplicates: TopicSpec = field(init=False)
    lifecycle_acquisition: TopicSpec = field(init=False)
    lifecycle_purchase: TopicSpec = field(init=False)
    lifecycle_subscription: TopicSpec = field(init=False)
    lifecycle_reversal: TopicSpec = field(init=False)
    processor_dedupe: TopicSpec = field(init=False)
    processor_attribute: TopicSpec = field(init=False)
    processor_commission: TopicSpec = field(init=False)
    fx_rates: TopicSpec = field(init=False)
    outbound_retry: TopicSpec = field(init=False)
    outbound_dead: TopicSpec = field(init=False)
    outbound_deliveries: TopicSpec = field(init=False)

    def __post_init__(self) -> None:
        for attr, (suffix, key, partitions, schema, compacted, retention_ms) in _LAYOUT:
            name = f"{self.prefix}.{suffix}"
            if not self.prefix or not _LEGAL_NAME.fullmatch(name) or len(name) > _MAX_NAME_LEN:
                raise ValueError(f"illegal Kafka topic prefix {self.prefix!r}")
            object.__setattr__(self, attr, TopicSpec(name, key, partitions, schema, compacted, retention_ms))

    def all(self) -> list[TopicSpec]:
        """Every topic, in pipeline order."""
        return [getattr(self, attr) for attr, _ in _LAYOUT]

    # Consumer groups are owned here, next to the topics they read, so the services, the
    # supervisor's lag display, benchmarks and tests cannot drift apart.
    @property
    def processor_group(self) -> str:
        """The faust processor's consumer group (reads raw-postbacks, clicks and the processor-* topics)."""
        return f"{self.prefix}-processor"

    @property
    def sink_clickhouse_group(self) -> str:
        """The ClickHouse writer's consumer group."""
        return f"{self.prefix}-sink-clickhouse"

    @property
    def sink_lifecycle_group(self) -> str:
        """The lifecycle router's consumer group."""
        return f"{self.prefix}-sink-lifecycle"

    @property
    def outbound_group(self) -> str:
        """The outbound delivery service's consumer group (reads conversions and outbound-retry)."""
        return f"{self.prefix}-outbound"


def ensure_topics(
    admin_client: AdminClient,
    topics: Topics | Iterable[TopicSpec],
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    Idempotent: a topic that already exists is left as it is (its partitions and
    config are not checked or changed). Any other failure raises ``KafkaException``.
    """
    specs = topics.all() if isinstance(topics, Topics) else list(topics)
    if not specs:
        return []
    new_topics = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication_factor, config=s.config())
        for s in specs
    ]
    futures = admin_client.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not (isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise
        else:
            created.append(name)
    return created
