"""The ClickHouse client factory every process uses (sinks, receipt lookups, the demo, trace)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def client_factory(url: str, database: str | None = None) -> Callable[[], Any]:
    """A callable that opens a new clickhouse-connect client for `url` (optionally bound to `database`).

    A factory rather than a client: clickhouse-connect clients are session-bound, so each
    thread (and each reconnect) makes its own.
    """
    def make() -> Any:
        import clickhouse_connect

        kwargs: dict[str, Any] = {"database": database} if database else {}
        return clickhouse_connect.get_client(dsn=url, **kwargs)

    return make
