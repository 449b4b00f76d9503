"""The optional testcontainers provider, used only when a Docker engine answers.

Kept deliberately small: this project's own machines have no Docker engine, so the
local-process provider is the one CI exercises. Images carry the same major versions
as the local stack (Kafka 4.x in KRaft mode, ClickHouse 26.x).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

KAFKA_IMAGE = "confluentinc/cp-kafka:8.0.0"  # Apache Kafka 4.0, KRaft
CLICKHOUSE_IMAGE = "clickhouse/clickhouse-server:26.9"


def docker_available() -> bool:
    """True when a Docker engine answers a ping within two seconds."""
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - no client, no socket, no engine: all mean "not available"
        return False


@contextlib.contextmanager
def kafka() -> Iterator[str]:
    from testcontainers.community.kafka import KafkaContainer

    with KafkaContainer(KAFKA_IMAGE).with_kraft() as container:
        yield container.get_bootstrap_server()


@contextlib.contextmanager
def clickhouse() -> Iterator[str]:
    from testcontainers.community.clickhouse import ClickHouseContainer

    with ClickHouseContainer(CLICKHOUSE_IMAGE) as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(8123)
        yield f"http://{container.username}:{container.password}@{host}:{port}"
