"""pytest fixtures for the real Kafka and ClickHouse, built on the same code as `postback stack`.

Enable with `pytest_plugins = ["deploy.pytest_plugin"]` in a conftest. Session-scoped
`kafka` / `clickhouse` fixtures start (or find) one broker and one server for the whole
run; function-scoped `topic` / `ch_database` give each test fresh names so tests never
see each other's data. Provider order is in `deploy.providers`. Services started here
stop at session end, also when tests fail, and die with the test process if it is killed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deploy.providers import ClickHouseService, KafkaService, clickhouse_service, kafka_service
from postback.config import Settings


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings.from_env()


@pytest.fixture(scope="session")
def kafka(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaService]:
    with kafka_service(settings, tmp_path_factory.mktemp("kafka")) as service:
        yield service


@pytest.fixture(scope="session")
def clickhouse(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClickHouseService]:
    with clickhouse_service(settings, tmp_path_factory.mktemp("clickhouse")) as service:
        yield service


@pytest.fixture
def topic(kafka: KafkaService) -> str:
    """A fresh single-partition topic for this test."""
    return kafka.create_topic("test")


@pytest.fixture
def ch_database(clickhouse: ClickHouseService) -> Iterator[str]:
    """A fresh ClickHouse database for this test, dropped afterwards."""
    name = clickhouse.create_database("test")
    yield name
    clickhouse.drop_database(name)
