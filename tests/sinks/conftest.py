"""A sink process against the real Kafka and the real ClickHouse, with records produced by the test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Producer

from deploy.procs import stop_processes
from deploy.providers import ClickHouseService, KafkaService, unique_name
from postback.kafka import producer_config
from postback.topics import Topics, ensure_topics
from schemas.codec import Codec


@dataclass
class SinkHarness:
    kafka: KafkaService
    clickhouse_url: str
    database: str
    topics: Topics
    tmp: Path
    producer: Producer
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        full_env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.kafka.bootstrap_servers,
                        CLICKHOUSE_URL=self.clickhouse_url, POSTBACK_TOPIC_PREFIX=self.topics.prefix,
                        **(env or {}))
        log = open(self.tmp / f"sink-{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "sink", "--database", self.database,
                                 "--batch-seconds", "0.3", *extra],
                                env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()
        self.procs.append(proc)
        return proc

    def produce(self, topic: str, schema: str, record: dict, key: str) -> None:
        self.producer.produce(topic, Codec.for_record(schema).encode(record), key.encode())

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp.glob("sink-*.log")))

    def stop_all(self) -> None:
        stop_processes(self.procs)


@pytest.fixture
def sink(kafka: KafkaService, clickhouse: ClickHouseService, tmp_path: Path) -> Iterator[SinkHarness]:
    topics = Topics(unique_name("st"))
    ensure_topics(kafka.admin(), topics)
    database = unique_name("sink")
    harness = SinkHarness(kafka, clickhouse.url, database, topics, tmp_path,
                          Producer(producer_config(kafka.bootstrap_servers, 30.0)))
    yield harness
    harness.stop_all()
    clickhouse.drop_database(database)


def wait_until_rows(client, sql: str, want: int, timeout: float = 90.0, harness: SinkHarness | None = None) -> int:
    deadline = time.monotonic() + timeout
    got = -1
    while time.monotonic() < deadline:
        try:
            got = client.query(sql).result_rows[0][0]
        except Exception:  # noqa: BLE001 - database/tables may not exist yet
            got = -1
        if got >= want:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{sql!r} gave {got}, wanted {want}" + (f"\n{harness.logs()}" if harness else ""))


NOW = 1_800_000_000_000


def conversion(i: int, *, order: str | None = None, event: str = "purchase", status: str = "approved",
               version: int = 1, sign: int = 1, amount: str = "10.00", attributed: bool = True,
               customer: str | None = None, receipt: str | None = None) -> dict:
    order = order or f"O{i}"
    return {
        "conversion_id": f"conv-{event}-{order}", "receipt_id": receipt or f"R{i}-{version}-{event}",
        "advertiser_id": "acme", "offer_id": "offer-1", "affiliate_id": f"aff-{i % 3}", "campaign_id": None,
        "click_id": f"C{i}", "sub1": None, "sub2": None, "sub3": None, "sub4": None, "sub5": None, "event": event,
        "status": status, "order_id": order, "customer_id": customer, "period": None, "amount": Decimal(amount),
        "currency": "USD", "event_time_ms": NOW + i, "received_at_ms": NOW + i, "processed_at_ms": NOW + i + 50,
        "clicked_at_ms": NOW - 60_000, "attributed": attributed,
        "attribution": "attributed" if attributed else "no_click", "click_to_conversion_s": 60,
        "dedupe_key": f"acme|{event}|{order}", "version": version, "sign": sign, "auth_mode": "hmac", "extras": [],
    }
