"""Batch publishing: envelopes, partitioning that matches the ingester's producer, acknowledged sends."""

from __future__ import annotations

import asyncio
import json
import random
import string
from decimal import Decimal

import pytest

from deploy.providers import KafkaService
from postback.kafka import AsyncProducer, KafkaUnavailable, producer_config
from processors import stages
from processors.runtime.publish import Publisher, decode_envelope, encode_envelopes, partition_for
from schemas.codec import Codec, decode_any
from tests.processors.test_stages import BASE, CLICK, NOW, PARTNERS, signed


def test_envelopes_keep_order_per_partition_and_exact_amounts() -> None:
    items = [(i % 3, stages.encode_internal({"n": i, "amount": Decimal("0.10") * i})) for i in range(30)]
    envelopes = encode_envelopes(items)
    assert sorted(p for p, _ in envelopes) == [0, 1, 2]
    for partition, value in envelopes:
        records = decode_envelope(value)
        assert [r["n"] for r in records] == [i for i in range(30) if i % 3 == partition]
        assert all(r["amount"] == Decimal("0.10") * r["n"] and isinstance(r["amount"], Decimal)
                   for r in records if r["n"])


def test_envelopes_are_split_by_size_without_reordering() -> None:
    items = [(0, json.dumps({"n": i, "pad": "x" * 100})) for i in range(100)]
    envelopes = encode_envelopes(items, max_bytes=1000)
    assert len(envelopes) > 10
    assert all(len(value) <= 1000 + 150 for _, value in envelopes)  # at most one item over the limit
    assert [r["n"] for _, value in envelopes for r in decode_envelope(value)] == list(range(100))


def test_an_envelope_must_be_an_array() -> None:
    with pytest.raises(ValueError):
        decode_envelope(b'{"n": 1}')


def _all_output_kinds() -> list[stages.Output]:
    """One stage output of every public kind, from the real stages."""
    rejection = stages.verify(dict(signed(BASE), params=[]), PARTNERS, NOW)  # no advertiser_id
    message = stages.verify(signed(BASE), PARTNERS, NOW).record
    table: dict = {}
    to_attribute = stages.dedupe(message, table, 0, NOW)
    duplicate = stages.dedupe(dict(message, receipt_id="R2", replay_key="other"), table, 0, NOW)
    clicks: dict = {}
    stages.click_arrived(CLICK, clicks, {}, PARTNERS, NOW)
    [conversion] = stages.attribute_conversion(to_attribute.record, clicks, {}, 0, PARTNERS, NOW)
    assert [o.kind for o in (rejection, duplicate, conversion)] == ["rejection", "duplicate", "conversion"]
    return [rejection, duplicate, conversion, to_attribute]


def test_stage_outputs_are_valid_avro_so_the_hot_path_may_skip_validation() -> None:
    publisher = Publisher(lambda: None, None, {"conversion": "c", "rejection": "r",  # type: ignore[arg-type]
                                               "duplicate": "d"}, {"attribute": "a"}, 6)
    outputs = _all_output_kinds()
    records = publisher.records(outputs)
    by_topic = {topic: value for topic, _key, value, _partition in records}
    for out in outputs[:3]:
        codec = Codec.for_record({"conversion": "Conversion", "rejection": "Rejection",
                                  "duplicate": "Duplicate"}[out.kind])
        topic = {"conversion": "c", "rejection": "r", "duplicate": "d"}[out.kind]
        assert by_topic[topic] == codec.encode(out.record, validated=True)
    [(_, key, value, partition)] = [r for r in records if r[0] == "a"]
    assert key is None and partition == partition_for("C1", 6)
    assert decode_envelope(value)[0]["receipt_id"] == outputs[3].record["receipt_id"]


def test_partition_for_matches_the_ingesters_producer(kafka: KafkaService) -> None:
    """Co-partitioning of the attribute topic with the clicks topic depends on this."""
    from confluent_kafka import Producer

    topic = kafka.create_topic("copart", partitions=6)
    producer = Producer(producer_config(kafka.bootstrap_servers))
    rng = random.Random(7)
    keys = ["".join(rng.choices(string.ascii_letters + string.digits + "-_é", k=rng.randrange(1, 40)))
            for _ in range(300)]
    landed: dict[str, int] = {}
    for key in keys:
        producer.produce(topic, b"v", key.encode(),
                         on_delivery=lambda err, msg: landed.__setitem__(msg.key().decode(), msg.partition()))
    assert producer.flush(30) == 0
    assert landed == {key: partition_for(key, 6) for key in keys}
    assert len(set(landed.values())) == 6


def test_publish_waits_for_every_record_and_envelopes_arrive(kafka: KafkaService) -> None:
    names = {kind: kafka.create_topic(kind, partitions=6) for kind in ("conversion", "rejection", "duplicate",
                                                                        "attribute")}
    outputs = _all_output_kinds() * 50

    async def run() -> int:
        producer = AsyncProducer(producer_config(kafka.bootstrap_servers), asyncio.get_running_loop())
        publisher = Publisher(lambda: None, producer, {k: names[k] for k in ("conversion", "rejection", "duplicate")},
                              {"attribute": names["attribute"]}, 6)
        await publisher.publish(outputs)
        assert producer.queue_depth() == 0  # returned only once all were acknowledged
        await publisher.close()
        return publisher.published

    published = asyncio.run(run())
    for kind in ("conversion", "rejection", "duplicate"):
        records = kafka.read(names[kind])
        assert len(records) == 50
        assert {decode_any(m.value())[1]["receipt_id"] for m in records} == \
            {next(o for o in outputs if o.kind == kind).record["receipt_id"]}
    envelopes = kafka.read(names["attribute"])
    assert sum(len(decode_envelope(m.value())) for m in envelopes) == 50
    assert {m.partition() for m in envelopes} == {partition_for("C1", 6)}
    assert published == 150 + len(envelopes)


def test_publish_retries_until_acknowledged_and_fails_loudly_when_stopping() -> None:
    failures: list[int] = []

    async def run() -> int:
        attempts = 0

        def stopping() -> bool:
            nonlocal attempts
            attempts += 1
            return attempts >= 2

        config = producer_config("127.0.0.1:1", delivery_timeout_s=0.5)  # nothing listens there
        producer = AsyncProducer(config, asyncio.get_running_loop())
        publisher = Publisher(lambda: failures.append(1), producer,
                              {"conversion": "c", "rejection": "r", "duplicate": "d"}, {}, 6)
        with pytest.raises(KafkaUnavailable):
            await asyncio.wait_for(publisher.publish(_all_output_kinds()[:1], stopping), 30)
        await publisher.close(timeout=0.1)
        return attempts

    assert asyncio.run(run()) == 2  # one failure retried, the second given up because we are stopping
    assert len(failures) == 2  # both counted (the processor's publish_failures metric)
