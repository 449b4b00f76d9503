"""Where Kafka and ClickHouse are, for every command: external settings first, then the local stack.

One resolution order for all processes, so `postback ingest`, `process`, `sink` and
`trace` never disagree about which cluster they talk to.
"""

from __future__ import annotations

from postback.config import Settings


def kafka_bootstrap(settings: Settings) -> str:
    """`KAFKA_BOOTSTRAP_SERVERS`, else the running local stack's broker; raises when there is neither."""
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    from deploy.stack import Stack

    bootstrap = Stack(settings).endpoints()["kafka"]
    if not bootstrap:
        raise RuntimeError("no Kafka: run `postback stack up` or set KAFKA_BOOTSTRAP_SERVERS")
    return bootstrap


def clickhouse_url(settings: Settings) -> str:
    """`CLICKHOUSE_URL`, else the running local stack's server, else the embedded engine under the state dir."""
    if settings.clickhouse_url:
        return settings.clickhouse_url
    from deploy.stack import Stack

    url = Stack(settings).endpoints()["clickhouse"]
    return url or f"chdb://{settings.state_dir / 'clickhouse-embedded'}"


def served_clickhouse_url(settings: Settings) -> str | None:
    """A ClickHouse other processes can share (never the embedded engine, whose directory one process owns)."""
    url = clickhouse_url(settings)
    return None if url.startswith("chdb:") else url
