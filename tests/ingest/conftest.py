"""A real ingester process per test module, wired to the session's real Kafka."""

from __future__ import annotations

import http.client as httpclient
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.procs import free_port, wait_until
from deploy.providers import KafkaService, unique_name
from postback.topics import Topics

EXAMPLE_PARTNERS = Path(__file__).parents[2] / "deploy" / "partners.example.toml"
BULK_TOKEN = "example-bulk-import-token-change-me"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        import json

        return json.loads(self.body)


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 15.0) -> Response:
    """One request, no redirect following, any status returned (not raised)."""
    parts = urllib.parse.urlsplit(url)
    conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@dataclass
class IngesterProcess:
    url: str
    topics: Topics
    proc: subprocess.Popen[str]
    log: Path

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_ingester(kafka: KafkaService, tmp: Path, *extra: str, bootstrap: str | None = None,
                   partners: Path | None = None, env: dict[str, str] | None = None) -> IngesterProcess:
    port = free_port()
    prefix = unique_name("it")
    if partners is None:
        partners = tmp / "partners.toml"
        partners.write_text(EXAMPLE_PARTNERS.read_text())
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=bootstrap or kafka.bootstrap_servers,
               POSTBACK_TOPIC_PREFIX=prefix, POSTBACK_CONFIG=str(partners), **(env or {}))
    log = tmp / f"ingest-{port}.log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "ingest", "--port", str(port), *extra],
                            env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    out.close()
    url = f"http://127.0.0.1:{port}"
    ing = IngesterProcess(url, Topics(prefix), proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ingester exited: {log.read_text()}")
        if "ingest listening on" not in log.read_text():  # printed once every worker listens
            return False
        try:
            return http(url + "/healthz", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(up, 60, "the ingester to answer /healthz")
    except BaseException:
        ing.stop()
        raise
    return ing


@pytest.fixture(scope="module")
def ingester(kafka: KafkaService, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngesterProcess]:
    ing = start_ingester(kafka, tmp_path_factory.mktemp("ingest"), "--body-read-timeout", "2")
    yield ing
    code = ing.stop()
    assert code == 0, ing.log.read_text()


def wait_count(kafka: KafkaService, topic: str, want: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    count = kafka.count(topic)
    while count < want and time.monotonic() < deadline:
        time.sleep(0.2)
        count = kafka.count(topic)
    return count
