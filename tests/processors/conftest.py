"""Real faust processor workers against the session's real Kafka."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Producer

from deploy.procs import free_port, stop_processes
from deploy.providers import KafkaService, unique_name
from postback.kafka import producer_config
from postback.topics import Topics, ensure_topics
from processors.signing import sign_query
from schemas.codec import Codec, decode_any

SECRET = "demo-secret-k1-0123456789abcdef"
PARTNERS_TOML = f"""
[advertisers.demo]
auth_modes = ["hmac", "token"]
secrets = {{ k1 = "{SECRET}" }}
token = "demo-legacy-token-0123456789abcdef"
[offers.offer-1]
advertiser_id = "demo"
attribution_window_days = 7
"""


@dataclass
class Pipeline:
    """A topic prefix with its topics, a producer for inputs, and the worker processes."""

    kafka: KafkaService
    topics: Topics
    partners: Path
    tmp: Path
    producer: Producer
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    web_ports: list[int] = field(default_factory=list)

    def start_worker(self, data_dir: Path, late_click_wait: float = 3.0,
                     extra_args: list[str] | None = None) -> subprocess.Popen[str]:
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.kafka.bootstrap_servers,
                   POSTBACK_TOPIC_PREFIX=self.topics.prefix, POSTBACK_CONFIG=str(self.partners))
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "w")
        self.web_ports.append(free_port())
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "process", "--data-dir", str(data_dir), "--web-port",
             str(self.web_ports[-1]), "--late-click-wait", str(late_click_wait), "--session-timeout", "6",
             *(extra_args or [])],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()
        self.procs.append(proc)
        return proc

    def send_raw(self, record: dict, key: str | None = None) -> None:
        self.producer.produce(self.topics.raw_postbacks.name, Codec.for_record("RawPostback").encode(record),
                              (key or record["receipt_id"]).encode())

    def send_click(self, click: dict) -> None:
        self.producer.produce(self.topics.clicks.name, Codec.for_record("Click").encode(click),
                              click["click_id"].encode())

    def flush(self) -> None:
        assert self.producer.flush(30) == 0

    def outputs(self) -> dict[str, list[tuple[str, dict]]]:
        """receipt_id -> [(kind, record)] over conversions, rejections and duplicates."""
        found: dict[str, list[tuple[str, dict]]] = {}
        for spec in (self.topics.conversions, self.topics.rejections, self.topics.duplicates):
            for msg in self.kafka.read(spec.name, timeout=60):
                name, record = decode_any(msg.value())
                found.setdefault(record["receipt_id"], []).append((name, record))
        return found

    def wait_for(self, receipts: set[str], timeout: float = 120.0) -> dict[str, list[tuple[str, dict]]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.outputs()
            if receipts <= set(found):
                return found
            for proc in self.procs:
                if proc.poll() not in (None, -signal.SIGKILL, -signal.SIGTERM, 0):
                    raise AssertionError(f"worker exited with {proc.returncode}: {self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(receipts - set(found))} of {len(receipts)} receipts have no output "
                                     f"after {timeout}s; worker logs:\n{self.logs()[-3000:]}")
            time.sleep(1.0)

    def group_lag(self) -> dict[str, int]:
        """Per input topic of the processor group (suffix after the prefix): high watermarks minus
        committed offsets, summed over partitions."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.kafka.bootstrap_servers,
                             "group.id": self.topics.processor_group, "enable.auto.commit": False})
        try:
            lag: dict[str, int] = {}
            for spec in (self.topics.raw_postbacks, self.topics.processor_dedupe, self.topics.processor_attribute,
                         self.topics.clicks):
                tps = [TopicPartition(spec.name, p) for p in range(spec.partitions)]
                committed = consumer.committed(tps, timeout=10)
                total = 0
                for tp in committed:
                    high = consumer.get_watermark_offsets(TopicPartition(spec.name, tp.partition), timeout=10)[1]
                    total += high - max(tp.offset, 0)
                lag[spec.name.removeprefix(self.topics.prefix + ".")] = total
            return lag
        finally:
            consumer.close()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.tmp.glob("worker-*.log")))

    def stop_all(self) -> None:
        stop_processes(self.procs)


@pytest.fixture
def pipeline(kafka: KafkaService, tmp_path: Path) -> Iterator[Pipeline]:
    topics = Topics(unique_name("pt"))
    ensure_topics(kafka.admin(), topics)
    partners = tmp_path / "partners.toml"
    partners.write_text(PARTNERS_TOML)
    producer = Producer(producer_config(kafka.bootstrap_servers, 30.0))
    pipe = Pipeline(kafka, topics, partners, tmp_path, producer)
    yield pipe
    pipe.stop_all()


def raw_postback(params: list[tuple[str, str]], receipt: str, received_at_ms: int, sign: bool = True) -> dict:
    if sign:
        params = sign_query(params, SECRET, received_at_ms // 1000, "k1")
    return {"receipt_id": receipt, "received_at_ms": received_at_ms, "remote_ip": "127.0.0.1", "method": "GET",
            "path": "/postback", "content_type": None, "params": [{"key": k, "value": v} for k, v in params],
            "body": b"", "headers": [], "ingester_id": "test"}


def click(click_id: str, clicked_at_ms: int, affiliate: str = "aff-1") -> dict:
    return {"click_id": click_id, "clicked_at_ms": clicked_at_ms, "offer_id": "offer-1", "affiliate_id": affiliate,
            "campaign_id": None, "sub1": "s1", "sub2": None, "sub3": None, "sub4": None, "sub5": None, "ip": None,
            "user_agent": None, "referer": None, "source": "redirect", "extras": []}


def handled_events(web_port: int, agent: str) -> float:
    """How many events a worker's agent handled, from its /metrics (0 until its web server is up)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(f'postback_processor_events_total{{agent="{agent}"}}'):
            return float(line.split()[-1])
    return 0.0
