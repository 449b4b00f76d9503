"""Faults under a steady stream of signed postbacks: nothing that got a 202 is lost or counted twice.

Each scenario runs its own `postback run`, sends ~STREAM_S seconds of unique, correctly
signed postbacks at ~RATE/s (a third of them naming real clicks), injects one fault
mid-stream, then waits (bounded) until every 202 receipt has its outcome row and checks
`assert_every_202_recorded_once`. Non-202 answers (503, connection errors) are allowed
while a fault lasts; they are not counted as accepted. Only the child the test killed may
have been restarted by the supervisor, no faust agent or sink thread may have crashed,
and `postback run` must still stop cleanly (exit 0, nothing left behind).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.clickhouse_local import ClickHouseOptions, LocalClickHouse
from deploy.kafka_jars import ensure_jars
from deploy.kafka_local import KafkaOptions, LocalKafka
from deploy.procs import free_port
from deploy.providers import ClickHouseService, KafkaService, unique_name
from postback.config import Settings

from .conftest import (Pipeline, PostbackStream, assert_every_202_recorded_once, eventually, ingest_workers,
                       make_clicks, warm_up)

RATE = 120.0
#: Stream length around the fault: LEAD_S before it, then until STREAM_S in total.
LEAD_S = 5.0
STREAM_S = 20.0
#: ... and at least this long after the fault is over.
TAIL_S = 3.0


@pytest.fixture
def own_kafka(tmp_path: Path, settings: Settings) -> Iterator[LocalKafka]:
    """A broker of this test's own, on fixed ports, so it can be stopped and started again."""
    if settings.kafka_bootstrap_servers:
        pytest.skip("needs a local broker it may stop")
    jars = ensure_jars(settings.cache_dir, settings.kafka_version)
    broker = LocalKafka(tmp_path / "kafka", jars, KafkaOptions(port=free_port(), controller_port=free_port(),
                                                               heap_mb=512, die_with_parent=True))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def own_clickhouse(tmp_path: Path, settings: Settings) -> Iterator[LocalClickHouse]:
    """A ClickHouse server of this test's own, on fixed ports, so it can be stopped and started again."""
    if settings.clickhouse_url:
        pytest.skip("needs a local ClickHouse it may stop")
    server = LocalClickHouse(tmp_path / "clickhouse", ClickHouseOptions(http_port=free_port(), tcp_port=free_port(),
                                                                       die_with_parent=True))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _bootstrap(broker: LocalKafka) -> str:
    return f"{broker.opts.host}:{broker.opts.port}"


def _url(server: LocalClickHouse) -> str:
    return f"http://{server.opts.host}:{server.opts.http_port}"


def _assert_no_unexpected_crash(pipe: Pipeline, restarts: set[str]) -> None:
    """Only the children in `restarts` were restarted (each of them was), and no component crashed.

    A component here is a faust agent or a sink thread: their crash is logged while the
    process may live on, so the supervisor never sees it.
    """
    restarted = pipe.restarted()
    assert set(restarted) == restarts, (f"children restarted: {restarted} (expected only {sorted(restarts)})\n"
                                        f"{pipe.logs()}")
    crashes = [c for c in pipe.crashes() if "Crashed reason=" in c or c.endswith("crashed")]
    assert not crashes, "components crashed:\n" + "\n".join(crashes[:10]) + "\n" + pipe.logs()


@contextlib.contextmanager
def _checked(pipe: Pipeline) -> Iterator[None]:
    """Stop the pipeline at the end of the test body, so that a bad exit fails the test itself."""
    try:
        yield
    except BaseException:
        pipe.checked = True
        problems = pipe.shutdown()
        if problems:
            print("the pipeline also stopped badly:\n" + "\n".join(problems))
        raise
    pipe.stop_and_check()


def _stream_with_fault(pipe: Pipeline, fault: Callable[[PostbackStream], None], restarts: set[str] = frozenset()
                       ) -> dict:
    """Clicks, a warm-up postback through the whole path, the stream with `fault` at LEAD_S, the checks."""
    with _checked(pipe):
        tag = unique_name("o")
        clicks = make_clicks(pipe, 6)
        warm = warm_up(pipe, tag)
        stream = PostbackStream(pipe.url, tag, RATE, clicks).start()
        began = time.monotonic()
        try:
            time.sleep(LEAD_S)
            assert stream.count(202) > 0, "no 202 before the fault"
            fault(stream)
            time.sleep(max(TAIL_S, began + STREAM_S - time.monotonic()))
        finally:
            sends = stream.stop()
        ended = time.monotonic()
        _assert_no_unexpected_crash(pipe, set(restarts))
        summary = assert_every_202_recorded_once(pipe, [warm, *sends])
        summary["drain_s"] = round(time.monotonic() - ended, 1)
        _assert_no_unexpected_crash(pipe, set(restarts))
        assert summary["202"] >= RATE * STREAM_S * 0.3, f"too little traffic got through to test anything: {summary}"
        print(f"\n{summary}")
    return summary


def _kill_child(pipe: Pipeline, name: str) -> Callable[[PostbackStream], None]:
    def fault(_stream: PostbackStream) -> None:
        victim = pipe.child(name)
        os.kill(victim, signal.SIGKILL)
        replacement = pipe.child(name, not_pid=victim, timeout=30)  # the supervisor restarts it (1 s backoff)
        assert replacement != victim

    return fault


def test_sigkill_of_the_processor_mid_stream(pipeline_factory: Callable[..., Pipeline], kafka: KafkaService,
                                             clickhouse: ClickHouseService) -> None:
    pipe = pipeline_factory(kafka.bootstrap_servers, clickhouse.url)
    _stream_with_fault(pipe, _kill_child(pipe, "process"), restarts={"process"})


def test_sigkill_of_the_sink_mid_stream(pipeline_factory: Callable[..., Pipeline], kafka: KafkaService,
                                        clickhouse: ClickHouseService) -> None:
    pipe = pipeline_factory(kafka.bootstrap_servers, clickhouse.url)
    _stream_with_fault(pipe, _kill_child(pipe, "sink"), restarts={"sink"})


def test_kafka_broker_stop_and_restart_mid_stream(own_kafka: LocalKafka, clickhouse: ClickHouseService,
                                                  pipeline_factory: Callable[..., Pipeline]) -> None:
    # own_kafka comes first: fixtures are torn down in reverse, so the pipeline stops while its broker runs.
    pipe = pipeline_factory(_bootstrap(own_kafka), clickhouse.url)
    recovery: dict[str, float] = {}

    def fault(stream: PostbackStream) -> None:
        own_kafka.stop()
        time.sleep(8)
        own_kafka.start()
        back = time.monotonic()
        # The stream recovers: 202s again after the broker is back.
        eventually(lambda: stream.count(202, since=back) >= 50, 60, "202s after the broker came back")
        recovery["s"] = time.monotonic() - back
        time.sleep(3)

    summary = _stream_with_fault(pipe, fault)
    assert summary["statuses"].get(503, 0) + summary["statuses"].get(-1, 0) > 0, \
        f"the outage was not visible to the partner: {summary}"
    print(f"202s again {recovery['s']:.1f}s after the broker restart")


def test_clickhouse_stop_and_restart_mid_stream(own_clickhouse: LocalClickHouse, kafka: KafkaService,
                                                pipeline_factory: Callable[..., Pipeline]) -> None:
    pipe = pipeline_factory(kafka.bootstrap_servers, _url(own_clickhouse))

    def fault(_stream: PostbackStream) -> None:
        own_clickhouse.stop()
        time.sleep(15)
        own_clickhouse.start()

    _stream_with_fault(pipe, fault)


def test_sigkill_of_one_ingest_worker_mid_stream(pipeline_factory: Callable[..., Pipeline], kafka: KafkaService,
                                                 clickhouse: ClickHouseService) -> None:
    pipe = pipeline_factory(kafka.bootstrap_servers, clickhouse.url, "--ingest-workers", "2")
    ingest = pipe.child("ingest")
    workers = eventually(lambda: len(ingest_workers(ingest)) == 2 and ingest_workers(ingest), 30,
                         "two ingest workers")

    def fault(stream: PostbackStream) -> None:
        os.kill(workers[0], signal.SIGKILL)
        killed_at = time.monotonic()
        eventually(lambda: len([w for w in ingest_workers(ingest) if w != workers[0]]) == 2, 30,
                   "a replacement ingest worker")
        pipe.track()
        eventually(lambda: stream.count(202, since=killed_at + 1) >= 50, 30, "202s after the worker was killed")

    _stream_with_fault(pipe, fault)  # restarts=(): the ingest parent replaces its worker itself
