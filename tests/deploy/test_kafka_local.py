"""The local broker is real Apache Kafka: groups, compaction config and transactions work."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import ConfigResource, ResourceType

from deploy.kafka_local import KafkaOptions, server_properties
from deploy.providers import KafkaService


def _consume(consumer: Consumer, want: int, timeout: float = 30.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for msg in consumer.consume(want - len(got), timeout=0.5):
            if msg.error():
                raise KafkaException(msg.error())
            got.append(msg.value())
    return got


def _consumer(kafka: KafkaService, group: str, **extra: object) -> Consumer:
    return Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": group,
                     "auto.offset.reset": "earliest", "enable.auto.commit": False,
                     "session.timeout.ms": 6000, **extra})


def test_committed_offsets_survive_consumer_restart(kafka: KafkaService, topic: str) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "enable.idempotence": True, "acks": "all"})
    for i in range(10):
        producer.produce(topic, key=b"k", value=f"m{i}".encode())
    assert producer.flush(30) == 0

    group = f"g-{uuid.uuid4().hex[:8]}"
    first = _consumer(kafka, group)
    first.subscribe([topic])
    assert _consume(first, 4) == [f"m{i}".encode() for i in range(4)]
    first.commit(asynchronous=False)
    first.close()

    second = _consumer(kafka, group)
    committed = second.committed([TopicPartition(topic, 0)], timeout=10)
    assert committed[0].offset == 4
    second.subscribe([topic])
    assert _consume(second, 6) == [f"m{i}".encode() for i in range(4, 10)]
    second.close()


def test_compacted_topic_reads_its_config_back(kafka: KafkaService) -> None:
    name = kafka.create_topic("compact", partitions=2, config={"cleanup.policy": "compact"})
    resource = ConfigResource(ResourceType.TOPIC, name)
    configs = kafka.admin().describe_configs([resource])[resource].result(timeout=30)
    assert configs["cleanup.policy"].value == "compact"
    assert len(kafka.admin().list_topics(name, timeout=10).topics[name].partitions) == 2


def test_read_committed_consumer_skips_aborted_transaction(kafka: KafkaService, topic: str) -> None:
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers,
                         "transactional.id": f"tx-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, value=f"aborted-{i}".encode())
    assert producer.flush(30) == 0  # on the broker, not just queued (abort purges the queue)
    producer.abort_transaction(30)
    producer.begin_transaction()
    for i in range(2):
        producer.produce(topic, value=f"committed-{i}".encode())
    producer.commit_transaction(30)

    committed = _consumer(kafka, f"rc-{uuid.uuid4().hex[:8]}", **{"isolation.level": "read_committed"})
    committed.subscribe([topic])
    assert _consume(committed, 2) == [b"committed-0", b"committed-1"]
    assert _consume(committed, 1, timeout=2.0) == []  # nothing else is visible
    committed.close()

    # The aborted records were really written: read_uncommitted sees all five.
    raw = _consumer(kafka, f"ru-{uuid.uuid4().hex[:8]}", **{"isolation.level": "read_uncommitted"})
    raw.subscribe([topic])
    assert sorted(_consume(raw, 5)) == sorted(
        [f"aborted-{i}".encode() for i in range(3)] + [b"committed-0", b"committed-1"])
    raw.close()


def test_server_properties_are_single_node_kraft_on_loopback(tmp_path) -> None:
    text = server_properties(KafkaOptions(), 1234, 1235, tmp_path)
    assert "process.roles=broker,controller" in text
    assert "listeners=PLAINTEXT://127.0.0.1:1234,CONTROLLER://127.0.0.1:1235" in text
    assert "controller.quorum.voters=1@127.0.0.1:1235" in text
    assert f"log.dirs={tmp_path}" in text


def test_cluster_ids_never_look_like_options() -> None:
    from deploy.kafka_local import new_cluster_id

    ids = [new_cluster_id() for _ in range(5000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == 5000
