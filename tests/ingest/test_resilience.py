"""What partners rely on when things go wrong: no 202 without Kafka, recovery, clean shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from deploy.kafka_jars import ensure_jars
from deploy.kafka_local import KafkaOptions, LocalKafka
from deploy.procs import free_port
from deploy.providers import KafkaService
from postback.config import Settings
from schemas.codec import Codec

from .conftest import http, start_ingester, wait_count

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def own_kafka(tmp_path: Path, settings: Settings) -> Iterator[tuple[LocalKafka, KafkaService]]:
    """A broker of this test's own, on fixed ports, so it can be stopped and started again."""
    if settings.kafka_bootstrap_servers:
        pytest.skip("needs a local broker it may stop")
    jars = ensure_jars(settings.cache_dir, settings.kafka_version)
    broker = LocalKafka(tmp_path / "kafka", jars, KafkaOptions(port=free_port(), controller_port=free_port(),
                                                               heap_mb=512, die_with_parent=True))
    proc = broker.start()
    try:
        yield broker, KafkaService(proc.bootstrap_servers, "local")
    finally:
        broker.stop()


def _post(url: str, i: int) -> int:
    body = f"advertiser_id=acme&event=purchase&order_id=o{i}&amount=1.00&currency=USD".encode()
    return http(url + "/postback", "POST", body, FORM, timeout=30).status


def test_kafka_outage_gives_503_then_recovers_and_202s_equal_records(
        own_kafka: tuple[LocalKafka, KafkaService], tmp_path: Path) -> None:
    broker, kafka = own_kafka
    ing = start_ingester(kafka, tmp_path, "--delivery-timeout", "2")
    accepted = 0
    try:
        for i in range(20):
            assert _post(ing.url, i) == 202
            accepted += 1

        broker.stop()
        started = time.monotonic()
        resp = http(ing.url + "/postback", "POST", b"advertiser_id=acme&event=lead", FORM, timeout=30)
        assert resp.status == 503, resp.body
        assert resp.headers["retry-after"] == "2"
        assert resp.json()["status"] == "unavailable"
        assert time.monotonic() - started < 10
        assert http(ing.url + "/readyz", timeout=30).status == 503
        assert http(ing.url + "/healthz").status == 200  # alive, just not ready
        statuses = [_post(ing.url, 1000 + i) for i in range(3)]
        assert set(statuses) == {503}

        broker.start()
        deadline = time.monotonic() + 90
        recovered = False
        i = 2000
        while time.monotonic() < deadline:
            status = _post(ing.url, i)
            i += 1
            assert status in (202, 503)
            if status == 202:
                accepted += 1
                recovered = True
                break
            time.sleep(0.5)
        assert recovered, "the ingester did not recover after Kafka came back"
        for j in range(20):
            assert _post(ing.url, 5000 + j) == 202
            accepted += 1
        assert http(ing.url + "/readyz").status == 200
    finally:
        code = ing.stop()
    assert code == 0, ing.log.read_text()
    assert wait_count(kafka, ing.topics.raw_postbacks.name, accepted) == accepted
    time.sleep(1)
    assert kafka.count(ing.topics.raw_postbacks.name) == accepted, "a record without a 202 reached Kafka"


async def _fire(url: str, n: int) -> list[tuple[int, str | None]]:
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> tuple[int, str | None]:
            try:
                async with session.post(url + "/postback", data=f"advertiser_id=acme&event=lead&order_id=s{i}",
                                        headers=FORM, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    body = await resp.json()
                    return resp.status, body.get("receipt_id")
            except aiohttp.ClientError:
                return -1, None
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_sigterm_answers_in_flight_flushes_and_exits_zero(kafka: KafkaService, tmp_path: Path) -> None:
    ing = start_ingester(kafka, tmp_path)

    async def scenario() -> list[tuple[int, str | None]]:
        results: list[tuple[int, str | None]] = []
        async with aiohttp.ClientSession() as session:
            async def one(i: int) -> None:
                try:
                    async with session.post(ing.url + "/postback", data=f"advertiser_id=acme&event=lead&order_id={i}",
                                            headers=FORM, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                        results.append((resp.status, (await resp.json()).get("receipt_id")))
                except aiohttp.ClientError:
                    results.append((-1, None))

            tasks = []
            deadline = time.monotonic() + 30
            signalled = False
            i = 0
            # Keep 32 requests in flight; signal once some succeeded, stop once the server refuses.
            while time.monotonic() < deadline:
                tasks = [t for t in tasks if not t.done()]
                while len(tasks) < 32:
                    tasks.append(asyncio.create_task(one(i)))
                    i += 1
                await asyncio.sleep(0.005)
                if not signalled and sum(1 for s, _ in results if s == 202) >= 50:
                    ing.proc.send_signal(signal.SIGTERM)
                    signalled = True
                if signalled and ing.proc.poll() is not None:
                    break
            await asyncio.gather(*tasks)
        return results

    results = asyncio.run(scenario())
    assert ing.proc.wait(timeout=30) == 0, ing.log.read_text()
    statuses = [s for s, _ in results]
    assert set(statuses) <= {202, -1}, {s: statuses.count(s) for s in set(statuses)}
    ok = [r for s, r in results if s == 202]
    assert len(ok) >= 50
    topic = ing.topics.raw_postbacks.name
    wait_count(kafka, topic, len(ok))
    receipts = {Codec.for_record("RawPostback").decode(m.value())["receipt_id"] for m in kafka.read(topic)}
    missing = set(ok) - receipts
    assert not missing, f"202 without a record: {sorted(missing)}; ingester log:\n{ing.log.read_text()}"
    assert receipts == set(ok)


def test_several_workers_share_the_port(kafka: KafkaService, tmp_path: Path) -> None:
    ing = start_ingester(kafka, tmp_path, "--workers", "2")
    try:
        results = asyncio.run(_fire(ing.url, 400))
        assert [s for s, _ in results].count(202) == 400
    finally:
        code = ing.stop()
    assert code == 0, ing.log.read_text()
    records = kafka.read(ing.topics.raw_postbacks.name)
    assert len(records) == 400
    ingesters = {Codec.for_record("RawPostback").decode(m.value())["ingester_id"] for m in records}
    assert len(ingesters) == 2, f"one process served everything: {ingesters}"


def test_a_killed_worker_is_replaced_and_202s_stay_durable(kafka: KafkaService, tmp_path: Path) -> None:
    ing = start_ingester(kafka, tmp_path, "--workers", "2")
    try:
        children = Path(f"/proc/{ing.proc.pid}/task/{ing.proc.pid}/children").read_text().split()
        workers = [int(pid) for pid in children
                   if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
        assert len(workers) == 2, children
        first = asyncio.run(_fire(ing.url, 100))
        os.kill(workers[0], signal.SIGKILL)
        second = asyncio.run(_fire(ing.url, 300))  # some may fail while the kernel still routes to the dead one
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # a replacement worker appears
            now = Path(f"/proc/{ing.proc.pid}/task/{ing.proc.pid}/children").read_text().split()
            alive = [int(p) for p in now if int(p) != workers[0]
                     and "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
            if len(alive) == 2:
                break
            time.sleep(0.5)
        assert len(alive) == 2, "the dead worker was not replaced"
        third = asyncio.run(_fire(ing.url, 100))
        assert [s for s, _ in third].count(202) == 100
    finally:
        assert ing.stop() == 0, ing.log.read_text()
    accepted = {r for s, r in first + second + third if s == 202}
    records = kafka.read(ing.topics.raw_postbacks.name)
    receipts = [Codec.for_record("RawPostback").decode(m.value())["receipt_id"] for m in records]
    assert accepted <= set(receipts), "a 202 without its record"
