"""`postback sink`: the ClickHouse writer and the lifecycle router, each in its own thread.

Each thread owns its consumer (and the writer its ClickHouse client). SIGTERM/SIGINT set
one stop event: the writer inserts and commits its open batch, the router finishes its
transaction, and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

from postback.clickhouse import client_factory
from postback.config import SinkOptions, Settings
from postback.topics import Topics, ensure_topics

log = logging.getLogger("sinks")


def migrate(url: str, database: str, progress: Callable[[str], None] = print) -> list[int]:
    from sinks.migrations import apply_migrations

    return apply_migrations(client_factory(url)(), database, progress)


def serve(settings: Settings, bootstrap: str, url: str, opts: SinkOptions, only: str | None = None) -> int:
    """Run the writer and/or the router against Kafka `bootstrap` and ClickHouse `url` until SIGTERM."""
    from confluent_kafka.admin import AdminClient

    from sinks.clickhouse_writer import ClickHouseWriter, SinkMetrics
    from sinks.lifecycle import LifecycleRouter

    topics = Topics(settings.topic_prefix)
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), topics)
    registry = CollectorRegistry()
    if opts.metrics_port:
        start_http_server(opts.metrics_port, addr="127.0.0.1", registry=registry)
    stop = threading.Event()
    runners: list[tuple[str, Callable[[], None]]] = []
    if only in (None, "clickhouse"):
        migrate(url, opts.database, lambda m: log.info("%s", m))
        writer = ClickHouseWriter(bootstrap, topics, client_factory(url, opts.database), opts,
                                  SinkMetrics(registry))
        runners.append(("clickhouse-writer", lambda: writer.run(stop)))
    if only in (None, "lifecycle"):
        router = LifecycleRouter(bootstrap, topics, opts)
        runners.append(("lifecycle-router", lambda: router.run(stop)))
    failures: list[str] = []

    def guarded(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a dead thread must stop the process, loudly
                log.exception("%s crashed", name)
                failures.append(f"{name}: {exc}")
                stop.set()
        return run

    threads = [threading.Thread(target=guarded(name, fn), name=name) for name, fn in runners]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for thread in threads:
        thread.start()
    print(f"sink running ({', '.join(name for name, _ in runners)}) -> {url.split('@')[-1]} "
          f"database {opts.database}", flush=True)
    stop_seen: float | None = None
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.5)
        if stop.is_set():
            stop_seen = stop_seen or time.monotonic()
            if time.monotonic() - stop_seen > opts.shutdown_grace_s:
                _abandon([t.name for t in threads if t.is_alive()], opts.shutdown_grace_s, failures)
    return 1 if failures else 0


def _abandon(busy: list[str], grace_s: float, failures: list[str]) -> None:
    """Exit although threads are still inside a Kafka call (seen after a broker restart:
    a synchronous offset commit or a consumer close that waits for the coordinator).

    Why this is safe: offsets are committed only after their rows are inserted, and the
    router's transaction is aborted by the broker when it times out. What was not committed
    is consumed again and collapses (dedup tokens, ReplacingMergeTree, read_committed).
    Why it is needed: a supervisor gives a child a bounded time to stop, then SIGKILLs it.
    """
    log.error("%s still busy %.0f s after the stop request (blocked in a Kafka call); exiting without "
              "waiting: anything uncommitted is consumed again and collapses", ", ".join(busy), grace_s)
    logging.shutdown()
    os._exit(1 if failures else 0)
