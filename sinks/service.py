"""`postback sink`: the ClickHouse writer and the lifecycle router, each in its own thread.

Each thread owns its consumer (and the writer its ClickHouse client). SIGTERM/SIGINT set
one stop event: the writer inserts and commits its open batch, the router finishes its
transaction, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from postback.config import SinkOptions, Settings
from postback.endpoints import clickhouse_url
from postback.topics import Topics, ensure_topics

log = logging.getLogger("sinks")


def client_factory(url: str, database: str | None = None) -> Callable[[], Any]:
    def make() -> Any:
        import clickhouse_connect

        kwargs: dict[str, Any] = {"database": database} if database else {}
        return clickhouse_connect.get_client(dsn=url, **kwargs)

    return make


def migrate(url: str, database: str, progress: Callable[[str], None] = print) -> list[int]:
    from sinks.migrations import apply_migrations

    return apply_migrations(client_factory(url)(), database, progress)


def serve(settings: Settings, bootstrap: str, opts: SinkOptions, only: str | None = None) -> int:
    from confluent_kafka.admin import AdminClient

    from sinks.clickhouse_writer import ClickHouseWriter, SinkMetrics
    from sinks.lifecycle import LifecycleRouter

    topics = Topics(settings.topic_prefix)
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), topics)
    url = clickhouse_url(settings)
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
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.5)
    return 1 if failures else 0
