"""Where a Kafka or ClickHouse for tests (and tools) comes from, in a fixed order.

1. External: `KAFKA_BOOTSTRAP_SERVERS` / `CLICKHOUSE_URL` name a running cluster.
2. testcontainers: when a Docker engine answers (see `deploy.containers`).
3. Local processes: the same `LocalKafka` / `LocalClickHouse` that `postback stack`
   runs, on ephemeral ports, in a scratch directory, dying with their parent.

Each provider is a context manager yielding a service handle; leaving it stops what it
started and nothing else.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postback.config import Settings


def unique_name(prefix: str) -> str:
    """A name no other test run uses: `prefix_<12 hex>` (valid for topics and databases)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@dataclass
class KafkaService:
    """A reachable broker and helpers that give each test its own topics."""

    bootstrap_servers: str
    provider: str
    _admin: Any = field(default=None, repr=False)

    def admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        return self._admin

    def create_topic(self, prefix: str = "t", partitions: int = 1, config: dict[str, str] | None = None,
                     timeout: float = 30.0) -> str:
        from confluent_kafka.admin import NewTopic

        name = unique_name(prefix)
        futures = self.admin().create_topics([NewTopic(name, partitions, 1, config=config or {})])
        futures[name].result(timeout=timeout)
        return name

    def count(self, topic: str, timeout: float = 10.0) -> int:
        """Records in `topic`: the sum of its partitions' high watermarks (no transactions here)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap_servers, "group.id": unique_name("count")})
        try:
            return sum(_high_watermarks(consumer, topic, timeout).values())
        finally:
            consumer.close()

    def read(self, topic: str, timeout: float = 30.0) -> list[Any]:
        """Every record currently in `topic` (all partitions, up to the high watermarks)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.bootstrap_servers, "group.id": unique_name("read"),
                             "enable.auto.commit": False})
        try:
            ends = _high_watermarks(consumer, topic, timeout)
            consumer.assign([TopicPartition(topic, p, 0) for p in ends])
            want = sum(ends.values())
            out: list[Any] = []
            deadline = time.monotonic() + timeout
            while len(out) < want:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"read {len(out)} of {want} records from {topic} in {timeout}s")
                for msg in consumer.consume(1000, timeout=0.5):
                    if msg.error():
                        raise RuntimeError(str(msg.error()))
                    if msg.offset() < ends[msg.partition()]:
                        out.append(msg)
            return out
        finally:
            consumer.close()


def _high_watermarks(consumer: Any, topic: str, timeout: float) -> dict[int, int]:
    """Partition -> high watermark, retrying while a just-created topic's leaders are being elected."""
    from confluent_kafka import KafkaException, TopicPartition

    deadline = time.monotonic() + timeout
    while True:
        try:
            parts = consumer.list_topics(topic, timeout=timeout).topics[topic].partitions
            return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1] for p in parts}
        except KafkaException as exc:
            if not exc.args[0].retriable() and exc.args[0].code() not in (6, 3) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@dataclass
class ClickHouseService:
    """A reachable ClickHouse server (HTTP) and helpers that give each test its own database."""

    url: str
    provider: str

    def client(self, database: str | None = None, **kwargs: Any) -> Any:
        """A new clickhouse-connect client: one per thread/task, since clients are session-bound."""
        import clickhouse_connect

        if database:
            kwargs["database"] = database
        return clickhouse_connect.get_client(dsn=self.url, **kwargs)

    def create_database(self, prefix: str = "db") -> str:
        name = unique_name(prefix)
        self.client().command(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self.client().command(f"DROP DATABASE IF EXISTS {name}")


@contextlib.contextmanager
def kafka_service(settings: Settings, scratch: Path) -> Iterator[KafkaService]:
    if settings.kafka_bootstrap_servers:
        yield KafkaService(settings.kafka_bootstrap_servers, "external")
        return
    from deploy import containers

    if containers.docker_available():
        with containers.kafka() as bootstrap:
            yield KafkaService(bootstrap, "testcontainers")
        return
    from deploy.kafka_jars import ensure_jars
    from deploy.kafka_local import KafkaOptions, LocalKafka

    jars = ensure_jars(settings.cache_dir, settings.kafka_version, progress=print)
    broker = LocalKafka(scratch, jars, KafkaOptions(port=0, controller_port=0, heap_mb=512, die_with_parent=True))
    proc = broker.start()
    try:
        yield KafkaService(proc.bootstrap_servers, "local")
    finally:
        broker.stop()


@contextlib.contextmanager
def clickhouse_service(settings: Settings, scratch: Path) -> Iterator[ClickHouseService]:
    if settings.clickhouse_url and not settings.clickhouse_url.startswith("chdb:"):
        yield ClickHouseService(settings.clickhouse_url, "external")
        return
    from deploy import containers

    if containers.docker_available():
        with containers.clickhouse() as url:
            yield ClickHouseService(url, "testcontainers")
        return
    from deploy.clickhouse_local import ClickHouseOptions, LocalClickHouse

    server = LocalClickHouse(scratch, ClickHouseOptions(http_port=0, tcp_port=0, die_with_parent=True))
    proc = server.start()
    try:
        yield ClickHouseService(proc.url, "local")
    finally:
        server.stop()
