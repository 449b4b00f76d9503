"""Topic naming/layout and idempotent topic creation (with a fake admin client; no broker)."""

import dataclasses
from concurrent.futures import Future

import pytest
from confluent_kafka import KafkaError, KafkaException

from postback.topics import Topics, TopicSpec, ensure_topics
from schemas import SCHEMA_DIR
from schemas.codec import Codec


def test_default_names():
    topics = Topics()
    assert [t.name for t in topics.all()] == [
        "postback.clicks",
        "postback.raw-postbacks",
        "postback.conversions",
        "postback.rejections",
        "postback.duplicates",
        "postback.lifecycle.acquisition",
        "postback.lifecycle.purchase",
        "postback.lifecycle.subscription",
        "postback.lifecycle.reversal",
        "postback.processor-dedupe",
        "postback.processor-attribute",
        "postback.processor-commission",
        "postback.fx-rates",
        "postback.outbound-retry",
        "postback.outbound-dead",
        "postback.outbound-deliveries",
    ]
    assert topics.raw_postbacks.name == "postback.raw-postbacks"


def test_prefix():
    topics = Topics("staging.pb")
    assert all(t.name.startswith("staging.pb.") for t in topics.all())
    assert topics.lifecycle_reversal.name == "staging.pb.lifecycle.reversal"
    assert Topics("staging.pb") == topics
    # The longest name sets the limit: 226 + len(".lifecycle.subscription") == 249, Kafka's limit.
    assert Topics("x" * 226).lifecycle_subscription.name == "x" * 226 + ".lifecycle.subscription"


@pytest.mark.parametrize("prefix", ["", "has space", "slash/ed", "ü", "x" * 227])
def test_illegal_prefix(prefix):
    with pytest.raises(ValueError):
        Topics(prefix)


def test_layout():
    t = Topics()
    layout = {s.name.removeprefix("postback."): (s.key, s.partitions, s.schema) for s in t.all()}
    assert layout == {
        "clicks": ("click_id", 6, "Click"),
        "raw-postbacks": ("the order's dedupe key (aliases applied), else receipt_id", 6, "RawPostback"),
        "conversions": ("conversion_id", 6, "Conversion"),
        "rejections": ("receipt_id", 3, "Rejection"),
        "duplicates": ("receipt_id", 3, "Duplicate"),
        **{f"lifecycle.{family}": ("customer_id, else order_id, else conversion_id", 6, "Conversion")
           for family in ("acquisition", "purchase", "subscription", "reversal")},
        "processor-dedupe": ("partition of the dedupe key", 6, "internal-json"),
        "processor-attribute": ("partition of the click_id", 6, "internal-json"),
        "processor-commission": ("advertiser_id", 6, "internal-json"),
        "fx-rates": ("currency|date", 1, "FxRate"),
        "outbound-retry": ("endpoint_id", 6, "internal-json"),
        "outbound-dead": ("endpoint_id", 3, "internal-json"),
        "outbound-deliveries": ("conversion_id", 3, "OutboundDelivery"),
    }
    # Co-partitioned for the click/postback join (faust assigns partition N of each to one worker).
    assert t.clicks.partitions == t.raw_postbacks.partitions == t.processor_attribute.partitions
    assert t.processor_commission.partitions == t.processor_attribute.partitions
    assert not t.processor_commission.compacted and t.processor_commission.retention_ms == 7 * 86_400_000
    # One partition, compacted: every worker reads all rates; the latest per currency and day wins.
    assert t.fx_rates.compacted and t.fx_rates.retention_ms is None
    assert t.fx_rates.config() == {"cleanup.policy": "compact"}
    assert not t.outbound_retry.compacted and not t.outbound_deliveries.compacted


def test_groups():
    t = Topics("p")
    assert t.outbound_group == "p-outbound"
    assert len({t.processor_group, t.sink_clickhouse_group, t.sink_lifecycle_group, t.outbound_group}) == 4


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Topics().clicks = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        Topics().clicks.partitions = 1


@pytest.mark.parametrize("spec", [s for s in Topics().all() if s.schema != "internal-json"], ids=lambda s: s.name)
def test_schema_exists(spec):
    assert (SCHEMA_DIR / f"{spec.schema}.avsc").is_file()
    assert len(Codec.for_record(spec.schema).fingerprint) == 8


def test_config():
    spec = TopicSpec("p.x", "k", 1, "Click", compacted=True, retention_ms=None)
    assert spec.config() == {"cleanup.policy": "compact"}
    spec = TopicSpec("p.x", "k", 1, "Click", compacted=False, retention_ms=1000)
    assert spec.config() == {"cleanup.policy": "delete", "retention.ms": "1000"}


class FakeAdmin:
    def __init__(self, outcomes):
        self.outcomes = outcomes  # topic name -> None (created) or an exception
        self.requested = []

    def create_topics(self, new_topics, operation_timeout, request_timeout):
        self.requested.extend(new_topics)
        futures = {}
        for topic in new_topics:
            future = Future()
            outcome = self.outcomes.get(topic.topic)
            if outcome is None:
                future.set_result(None)
            else:
                future.set_exception(outcome)
            futures[topic.topic] = future
        return futures


def _exists():
    return KafkaException(KafkaError(KafkaError.TOPIC_ALREADY_EXISTS))


def test_ensure_topics_creates_and_tolerates_existing():
    topics = Topics()
    admin = FakeAdmin({topics.clicks.name: _exists()})
    created = ensure_topics(admin, topics, replication_factor=3)
    assert created == [t.name for t in topics.all()[1:]]
    requested = {t.topic: t for t in admin.requested}
    assert set(requested) == {t.name for t in topics.all()}
    conversions = requested[topics.conversions.name]
    assert conversions.num_partitions == 6 and conversions.replication_factor == 3
    assert conversions.config == {"cleanup.policy": "compact"}


def test_ensure_topics_accepts_an_iterable_of_specs():
    topics = Topics()
    admin = FakeAdmin({})
    assert ensure_topics(admin, [topics.rejections]) == [topics.rejections.name]
    assert ensure_topics(admin, []) == []


def test_ensure_topics_raises_other_errors():
    topics = Topics()
    admin = FakeAdmin({topics.duplicates.name: KafkaException(KafkaError(KafkaError.INVALID_REPLICATION_FACTOR))})
    with pytest.raises(KafkaException):
        ensure_topics(admin, topics)
