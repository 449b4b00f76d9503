"""The outbound delivery service against the real Kafka and loopback HTTP receivers.

Each receiver is a plain `http.server` on an ephemeral port whose answer depends on the
path and on how many times it has seen the request's Idempotency-Key there. Endpoints set
`allow_private = true` (the receivers are on loopback) and short retry schedules. An
affiliate counts deliveries by idempotency key, so "exactly one successful delivery" is
checked as: every key got a 2xx, and every 2xx carries a key of a produced conversion
version (a repeat after a crash carries the same key and counts once).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from confluent_kafka import Consumer, Producer
from prometheus_client import CollectorRegistry

from deploy.procs import stop_processes
from deploy.providers import KafkaService, unique_name
from postback.kafka import producer_config
from postback.partners import load_partner_config
from postback.topics import Topics, ensure_topics
from schemas.codec import Codec
from postback.config import OutboundOptions
from sinks.outbound.delivery import DeliveryService, OutboundMetrics, next_delay_s
from sinks.outbound.ledger import Ledger
from tests.sinks.conftest import conversion

SECRET = "outbound-test-secret-0123456789"

# -- no broker -------------------------------------------------------------------------


def test_ledger_commits_up_to_the_lowest_unsettled_offset():
    ledger = Ledger()
    tp = ("t", 0)
    a = ledger.take(tp, 10, 2)
    ledger.take(tp, 11, 0)
    ledger.take(tp, 12, 1)
    assert ledger.to_commit() == {tp: 10}
    ledger.settle(a, 10)
    assert ledger.to_commit() == {tp: 10}  # one job of offset 10 is still open
    ledger.settle(a, 10)
    assert ledger.to_commit() == {tp: 12}
    ledger.committed({tp: 12})
    assert ledger.to_commit() == {}
    ledger.settle(a, 12)
    assert ledger.to_commit() == {tp: 13} and ledger.unsettled() == 0
    ledger.revoke(tp)
    assert ledger.to_commit() == {} and a.revoked


def test_retry_delays_follow_the_schedule_then_every_six_hours():
    schedule = (60.0, 300.0)
    assert [next_delay_s(schedule, n) for n in (1, 2, 3, 4)] == [60.0, 300.0, 21600.0, 21600.0]


def test_status_summary():
    from app.commands.outbound import summarise

    def rec(endpoint, outcome, error=None):
        return {"endpoint": endpoint, "outcome": outcome, "error_class": error}

    rows = summarise([rec("a/x", "retry", "timeout"), rec("a/x", "delivered")]
                     + [rec("b/y", "retry", "http_5xx")] * 5 + [rec("b/y", "dead", "http_4xx")])
    assert rows["a/x"] == {"attempts": 2, "delivered": 1, "retrying": 1, "dead": 0, "consecutive_failures": 0,
                           "last_error": "timeout", "failing": False}
    assert rows["b/y"]["consecutive_failures"] == 6 and rows["b/y"]["failing"]
    assert rows["b/y"]["dead"] == 1 and rows["b/y"]["last_error"] == "http_4xx"


# -- receivers -----------------------------------------------------------------------


def _answer(path: str, seen: int) -> tuple[int, float]:
    """(status, seconds to wait before answering) for the `seen`-th request of a key on `path`."""
    if path == "/ok":
        return 200, 0.0
    if path == "/bad":
        return 400, 0.0
    if path == "/moved":
        return 302, 0.0
    if path == "/dead":  # never answers within the endpoint's timeout
        return 500, 4.0
    if path == "/flaky":  # 5xx, then a timeout, then fine
        return [(500, 0.0), (500, 2.0)][seen - 1] if seen <= 2 else (200, 0.0)
    if path == "/crash":  # two 503s, then fine
        return (503, 0.0) if seen <= 2 else (200, 0.0)
    return 404, 0.0


class Receiver:
    """A loopback affiliate server recording every request (before answering)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                key = self.headers.get("Idempotency-Key", "")
                with receiver.lock:
                    receiver.seen[(parts.path, key)] += 1
                    status, delay = _answer(parts.path, receiver.seen[(parts.path, key)])
                    receiver.requests.append({"path": parts.path, "query": parts.query, "key": key,
                                              "headers": dict(self.headers), "body": body, "status": status,
                                              "at": time.time(), "method": self.command})
                time.sleep(delay)
                try:
                    self.send_response(status)
                    if status == 302:
                        self.send_header("Location", "/ok")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, path: str, status: int | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path and (status is None or r["status"] == status)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- harness -------------------------------------------------------------------------


class Harness:
    def __init__(self, kafka: KafkaService, tmp: Path, receiver: Receiver) -> None:
        self.kafka = kafka
        self.tmp = tmp
        self.receiver = receiver
        self.topics = Topics(unique_name("ob"))
        ensure_topics(kafka.admin(), [self.topics.conversions, self.topics.outbound_retry,
                                      self.topics.outbound_dead, self.topics.outbound_deliveries])
        self.producer = Producer(producer_config(kafka.bootstrap_servers, 30.0))
        self.codec = Codec.for_record("Conversion")
        self.delivery_codec = Codec.for_record("OutboundDelivery")
        self.reader = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": unique_name("read"),
                                "auto.offset.reset": "earliest", "enable.auto.commit": False})
        self.reader.subscribe([self.topics.outbound_deliveries.name, self.topics.outbound_dead.name])
        self.deliveries: list[dict] = []
        self.dead: list[dict] = []
        self.services: list[tuple[threading.Event, threading.Thread]] = []
        self.procs: list[subprocess.Popen] = []
        self.config: Path | None = None

    def configure(self, endpoints: dict[str, str]) -> Path:
        """Write a partner file with aff-1's endpoints (name -> TOML body lines)."""
        text = "".join(f"[affiliates.aff-1.postbacks.{name}]\nallow_private = true\n{body}\n"
                       for name, body in endpoints.items())
        self.config = self.tmp / "partners.toml"
        self.config.write_text(text)
        return self.config

    def start_in_process(self, opts: OutboundOptions | None = None) -> DeliveryService:
        assert self.config is not None
        service = DeliveryService(self.kafka.bootstrap_servers, self.topics, load_partner_config(self.config),
                                  opts or OutboundOptions(session_timeout_s=6.0, commit_interval_s=0.3),
                                  OutboundMetrics(CollectorRegistry()))
        stop = threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(service.run(stop)), daemon=True)
        thread.start()
        self.services.append((stop, thread))
        return service

    def start_process(self) -> subprocess.Popen:
        env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=self.kafka.bootstrap_servers,
                   POSTBACK_TOPIC_PREFIX=self.topics.prefix, POSTBACK_CONFIG=str(self.config),
                   POSTBACK_STATE_DIR=str(self.tmp / "state"))
        log = open(self.tmp / f"outbound-{len(self.procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "outbound", "run", "--session-timeout", "6",
                                 "--commit-interval", "0.3"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True)
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp.glob("outbound-*.log")))

    def produce(self, i: int, **kw) -> str:
        record = conversion(i, **kw)
        record["affiliate_id"] = "aff-1"
        self.producer.produce(self.topics.conversions.name, self.codec.encode(record),
                              record["conversion_id"].encode())
        assert self.producer.flush(30) == 0
        return f"{record['conversion_id']}:{record['version']}"

    def read(self) -> None:
        for msg in self.reader.consume(1000, timeout=0.2):
            if msg.error():
                continue
            if msg.topic() == self.topics.outbound_dead.name:
                self.dead.append(json.loads(msg.value()))
            else:
                self.deliveries.append(self.delivery_codec.decode(msg.value()))

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            if condition():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def close(self) -> None:
        for stop, _thread in self.services:
            stop.set()
        for _stop, thread in self.services:
            thread.join(timeout=30)
        stop_processes(self.procs)
        self.reader.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def harness(kafka: KafkaService, tmp_path: Path, receiver: Receiver) -> Iterator[Harness]:
    h = Harness(kafka, tmp_path, receiver)
    yield h
    h.close()


def _verify_query_signature(query: str, fresh: bool = True) -> bool:
    """docs/signing.md, query signing: HMAC-SHA256 over the sorted, RFC 3986-encoded pairs except sig."""
    params = parse_qsl(query, keep_blank_values=True)
    sig = dict(params)["sig"]
    enc = lambda s: quote(s, safe="-_.~")  # noqa: E731
    canonical = "&".join(f"{k}={v}" for k, v in sorted((enc(k), enc(v)) for k, v in params if k != "sig"))
    expected = hmac.new(SECRET.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    in_tolerance = abs(int(dict(params)["ts"]) - time.time()) < 300
    return hmac.compare_digest(sig.lower(), expected) and (in_tolerance or not fresh)


def _verify_header_signature(headers: dict, body: bytes) -> bool:
    """docs/signing.md, header signing: HMAC-SHA256 over `<ts>.<body>`, sent as `v1=<hex>`."""
    ts = headers["X-Postback-Timestamp"]
    expected = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={expected}" in headers["X-Postback-Signature"].split(",")


class _FakeProducer:
    def __init__(self) -> None:
        self.sent: list[list[tuple]] = []

    async def send_batch(self, records):
        self.sent.append(list(records))


def test_attempt_outcomes_without_a_broker(tmp_path: Path, receiver: Receiver):
    """One attempt per endpoint kind: the delivery record and the retry/dead job it is settled by."""
    config = tmp_path / "partners.toml"
    config.write_text(
        f'[affiliates.aff-1.postbacks.flaky]\nallow_private = true\n'
        f'url = "{receiver.base}/flaky?k={{idempotency_key}}"\n'
        f'secret = "{SECRET}"\ntimeout_s = 0.5\nretry_schedule_s = [7]\n'
        f'[affiliates.aff-1.postbacks.bad]\nallow_private = true\nurl = "{receiver.base}/bad"\n'
        f'[affiliates.aff-1.postbacks.moved]\nallow_private = true\nurl = "{receiver.base}/moved"\n'
        f'[affiliates.aff-1.postbacks.follow]\nallow_private = true\nfollow_redirects = true\n'
        f'url = "{receiver.base}/moved"\n'
        f'[affiliates.aff-1.postbacks.closed]\nallow_private = true\nurl = "http://127.0.0.1:1/x?sig_token=s3cr3t"\n'
        f'[affiliates.aff-1.postbacks.private]\nurl = "{receiver.base}/ok"\n')
    partners = load_partner_config(config)
    clock = [1_900_000_000_000]
    service = DeliveryService("unused:9092", Topics("t"), partners, OutboundOptions(failing_after=2),
                              OutboundMetrics(CollectorRegistry()), now_ms=lambda: clock[0])
    service.producer = _FakeProducer()
    record = conversion(1)
    record["affiliate_id"] = "aff-1"
    codec = Codec.for_record("OutboundDelivery")

    start = clock[0] - 1000

    async def attempt(endpoint_id: str, n: int = 1):
        from sinks.outbound.delivery import Job, json_safe

        lane = service._lane(service.endpoints[endpoint_id])
        await service._attempt(lane, Job(endpoint_id, json_safe(record), n, 0, start, ""))
        sent = service.producer.sent[-1]
        return codec.decode(sent[0][2]), [(topic, json.loads(value)) for topic, _key, value, _p in sent[1:]], lane

    async def main():
        try:
            d, follow, lane = await attempt("aff-1/flaky")
            assert (d["outcome"], d["status"], d["error_class"]) == ("retry", 500, "http_5xx")
            assert follow[0][0] == "t.outbound-retry" and follow[0][1]["attempt"] == 2
            assert follow[0][1]["not_before_ms"] == clock[0] + 7000  # the schedule, on the injected clock
            d, follow, lane = await attempt("aff-1/flaky", 2)
            assert (d["outcome"], d["error_class"], d["status"]) == ("retry", "timeout", None)
            assert follow[0][1]["attempt"] == 3 and follow[0][1]["not_before_ms"] == clock[0] + 21_600_000
            assert lane.failing and service.metrics.failing.labels("aff-1/flaky")._value.get() == 1
            d, follow, lane = await attempt("aff-1/flaky", 3)
            assert (d["outcome"], d["status"], d["response_head"], follow) == ("delivered", 200, "ok", [])
            assert not lane.failing and lane.consecutive_failures == 0
            assert "sig=REDACTED" in d["url"] and d["idempotency_key"] == "conv-purchase-O1:1"
            d, follow, _lane = await attempt("aff-1/closed")
            assert (d["outcome"], d["error_class"], d["status"]) == ("retry", "connect", None)
            assert "s3cr3t" not in d["url"] and "s3cr3t" not in follow[0][1]["last_error"]
            for endpoint_id, reason in [("aff-1/bad", "http_4xx"), ("aff-1/moved", "redirect_refused"),
                                        ("aff-1/private", "refused_private")]:
                d, follow, _lane = await attempt(endpoint_id)
                assert (d["outcome"], d["error_class"]) == ("dead", reason)
                assert follow[0][0] == "t.outbound-dead" and follow[0][1]["reason"] == reason
            d, follow, _lane = await attempt("aff-1/follow")
            assert (d["outcome"], d["status"]) == ("delivered", 200)
            clock[0] += 4 * 86_400_000  # past give_up_after_s (3 days from the first attempt)
            receiver.seen.clear()
            d, follow, _lane = await attempt("aff-1/flaky", 9)
            assert (d["outcome"], follow[0][1]["reason"]) == ("dead", "gave_up")
        finally:
            for lane in service.lanes.values():
                lane.stopping = True
                lane.wake.set()
                if lane.session is not None:
                    await lane.session.close()
            await asyncio.gather(*(t for lane in service.lanes.values() for t in lane.workers))

    asyncio.run(main())
    # Signed at the injected clock's time, so only the signature itself is checked here.
    assert all(_verify_query_signature(r["query"], fresh=False) for r in receiver.on("/flaky"))
    assert [r["path"] for r in receiver.requests if r["path"] in ("/moved", "/ok")] == ["/moved", "/moved", "/ok"]


# -- with the broker -----------------------------------------------------------------

@pytest.mark.integration
def test_one_success_per_key_through_5xx_and_timeouts(harness: Harness, receiver: Receiver):
    harness.configure({"flaky": f'url = "{receiver.base}/flaky?cid={{click_id}}&k={{idempotency_key}}"\n'
                                f'secret = "{SECRET}"\ntimeout_s = 0.5\nretry_schedule_s = [0.2, 0.2, 0.2]\n'})
    harness.start_in_process()
    keys = {harness.produce(i) for i in range(5)}
    harness.wait(lambda: {r["key"] for r in receiver.on("/flaky", 200)} == keys, 60, "every key delivered")
    harness.wait(lambda: sum(d["outcome"] == "delivered" for d in harness.deliveries) >= 5, 30, "delivery records")
    time.sleep(1.0)  # nothing more may arrive
    ok = receiver.on("/flaky", 200)
    assert sorted(r["key"] for r in ok) == sorted(keys)  # one success per key
    assert all(_verify_query_signature(r["query"]) for r in receiver.on("/flaky"))
    by_key = collections.defaultdict(list)
    for d in harness.deliveries:
        by_key[d["idempotency_key"]].append(d)
    for key in keys:
        attempts = sorted(by_key[key], key=lambda d: d["attempt"])
        assert [(d["attempt"], d["outcome"], d["error_class"]) for d in attempts] == [
            (1, "retry", "http_5xx"), (2, "retry", "timeout"), (3, "delivered", None)]
        assert attempts[2]["status"] == 200 and attempts[2]["response_head"] == "ok"
        assert all("sig=REDACTED" in d["url"] and SECRET not in d["url"] for d in attempts)
    assert not harness.dead


@pytest.mark.integration
def test_post_signature_verifies(harness: Harness, receiver: Receiver):
    harness.configure({"json": f'url = "{receiver.base}/ok"\nmethod = "POST"\nsecret = "{SECRET}"\n'})
    harness.start_in_process()
    key = harness.produce(1)
    harness.wait(lambda: len(receiver.on("/ok", 200)) == 1, 60, "the POST")
    request = receiver.on("/ok")[0]
    assert request["method"] == "POST" and request["key"] == key
    assert _verify_header_signature(request["headers"], request["body"])
    assert json.loads(request["body"])["idempotency_key"] == key


@pytest.mark.integration
def test_a_dead_endpoint_does_not_delay_a_healthy_one(harness: Harness, receiver: Receiver):
    harness.configure({
        "dead": f'url = "{receiver.base}/dead?k={{idempotency_key}}"\ntimeout_s = 1.0\nmax_concurrency = 1\n'
                'retry_schedule_s = [0.1]\n',
        "healthy": f'url = "{receiver.base}/ok?k={{idempotency_key}}"\n',
    })
    harness.start_in_process()
    harness.produce(1000)  # warm-up: the group has joined once this arrives
    harness.wait(lambda: len(receiver.on("/ok")) == 1, 60, "the warm-up delivery")
    produced = {}
    for i in range(20):
        produced[harness.produce(i)] = time.time()
        time.sleep(0.1)
    harness.wait(lambda: len(receiver.on("/ok")) == 21, 30, "the healthy deliveries")
    latencies = [r["at"] - produced[r["key"]] for r in receiver.on("/ok") if r["key"] in produced]
    assert len(latencies) == 20 and max(latencies) < 2.0, latencies
    # Meanwhile the dead endpoint is held by its timeouts: one request at a time, each 1 s, so most of
    # its jobs have not even been tried yet.
    assert len({r["key"] for r in receiver.on("/dead")}) < 10
    harness.wait(lambda: any(d["endpoint"] == "aff-1/dead" and d["error_class"] == "timeout"
                             for d in harness.deliveries), 30, "a timeout record")


@pytest.mark.integration
def test_4xx_is_dead_lettered_without_retry(harness: Harness, receiver: Receiver):
    harness.configure({"strict": f'url = "{receiver.base}/bad?k={{idempotency_key}}"\n'
                                 'retry_schedule_s = [0.1, 0.1]\n'})
    harness.start_in_process()
    key = harness.produce(7)
    harness.wait(lambda: len(harness.dead) == 1, 60, "the dead letter")
    time.sleep(1.0)
    harness.read()
    assert len(receiver.on("/bad")) == 1
    dead = harness.dead[0]
    assert dead["reason"] == "http_4xx" and dead["endpoint"] == "aff-1/strict" and dead["attempt"] == 1
    assert f'{dead["conversion"]["conversion_id"]}:{dead["conversion"]["version"]}' == key
    assert [(d["outcome"], d["status"], d["error_class"]) for d in harness.deliveries] == [("dead", 400, "http_4xx")]
    # `postback outbound status` reads the same records.
    from app.commands.outbound import read_deliveries, summarise

    since = int(time.time() * 1000) - 3_600_000
    rows = summarise(read_deliveries(harness.kafka.bootstrap_servers, harness.topics, since))
    assert rows == {"aff-1/strict": {"attempts": 1, "delivered": 0, "retrying": 0, "dead": 1,
                                     "consecutive_failures": 1, "last_error": "http_4xx", "failing": False}}


@pytest.mark.integration
def test_sigkill_mid_retry_then_restart(harness: Harness, receiver: Receiver):
    harness.configure({"crash": f'url = "{receiver.base}/crash?k={{idempotency_key}}"\n'
                                'retry_schedule_s = [1.0, 5.0]\n'})
    first = harness.start_process()
    keys = {harness.produce(i) for i in range(10)}
    harness.wait(lambda: {r["key"] for r in receiver.on("/crash")} == keys
                 and any(receiver.seen[("/crash", k)] >= 2 for k in keys), 90, "first attempts and a retry")
    first.kill()  # SIGKILL, mid-retry: keys wait for attempt 2 or 3 (the third is 5 s after the second)
    first.wait(10)
    assert {r["key"] for r in receiver.on("/crash", 200)} != keys
    second = harness.start_process()
    harness.wait(lambda: {r["key"] for r in receiver.on("/crash", 200)} == keys, 120, "every key delivered")
    time.sleep(1.0)
    assert {r["key"] for r in receiver.on("/crash", 200)} == keys  # counted by key: exactly one each
    assert not harness.dead
    harness.wait(lambda: {d["idempotency_key"] for d in harness.deliveries if d["outcome"] == "delivered"} == keys,
                 30, "delivered records")
    second.terminate()  # SIGTERM: a clean stop
    assert second.wait(30) == 0, harness.logs()


@pytest.mark.integration
def test_a_retry_for_a_removed_endpoint_is_dead_lettered(harness: Harness, receiver: Receiver):
    harness.configure({"main": f'url = "{receiver.base}/ok"\n'})
    record = conversion(3)
    record["affiliate_id"] = "aff-1"
    job = {"endpoint": "aff-1/gone", "conversion": {**record, "amount": "10.00"}, "attempt": 2,
           "not_before_ms": int(time.time() * 1000) + 3_600_000, "first_attempt_ms": 1, "last_error": "x"}
    harness.producer.produce(harness.topics.outbound_retry.name, json.dumps(job).encode(), b"aff-1/gone")
    assert harness.producer.flush(30) == 0
    harness.start_in_process()
    harness.wait(lambda: len(harness.dead) == 1, 60, "the dead letter")
    assert harness.dead[0]["reason"] == "endpoint_removed" and harness.dead[0]["endpoint"] == "aff-1/gone"
    assert not receiver.requests and not harness.deliveries
