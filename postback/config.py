"""Typed configuration: environment variables for *where things run*.

Every process reads its settings here, once, into a frozen `Settings`; nothing else in
the code base reads `os.environ`. Per-advertiser and per-offer business configuration
(landing URLs, secrets, tokens) lives in the TOML file named by `POSTBACK_CONFIG`
and is loaded by `postback.partners` (added with the ingest stage).

Environment variables (all optional):

- `KAFKA_BOOTSTRAP_SERVERS`: use this Kafka cluster instead of the local stack's broker.
- `CLICKHOUSE_URL`: use this ClickHouse (`http://user:pass@host:8123/db` or
  `chdb:///path` for the in-process engine) instead of the local stack's server.
- `POSTBACK_STATE_DIR`: where the local stack keeps data, logs and pid files
  (default `./.postback`).
- `POSTBACK_CACHE_DIR`: per-user cache for downloaded Kafka jars
  (default `$XDG_CACHE_HOME/postback-pipeline` or `~/.cache/postback-pipeline`).
- `POSTBACK_CONFIG`: path of the partner TOML file.
- `POSTBACK_TOPIC_PREFIX`: prefix of every topic name (default `postback`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: The Apache Kafka release the local stack runs. One place; deploy/kafka/pom.xml
#: receives it as -Dkafka.version.
KAFKA_VERSION = "4.1.1"


def _default_cache_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "postback-pipeline"


@dataclass(frozen=True)
class Settings:
    """Where Kafka, ClickHouse and local state are. Build with `Settings.from_env()`."""

    kafka_bootstrap_servers: str | None
    clickhouse_url: str | None
    state_dir: Path
    cache_dir: Path
    config_file: Path | None
    topic_prefix: str
    kafka_version: str = KAFKA_VERSION

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        config_file = env.get("POSTBACK_CONFIG")
        return cls(
            kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS") or None,
            clickhouse_url=env.get("CLICKHOUSE_URL") or None,
            state_dir=Path(env.get("POSTBACK_STATE_DIR") or ".postback").absolute(),
            cache_dir=Path(env.get("POSTBACK_CACHE_DIR") or _default_cache_dir(env)).absolute(),
            config_file=Path(config_file).absolute() if config_file else None,
            topic_prefix=env.get("POSTBACK_TOPIC_PREFIX") or "postback",
        )


@dataclass(frozen=True)
class IngestOptions:
    """Tuning of one ingester process; `postback ingest` flags map onto these."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    #: Bodies above this get 413 (POST /postback); bulk imports get `bulk_max_body_bytes`.
    max_body_bytes: int = 64 * 1024
    bulk_max_body_bytes: int = 16 * 1024 * 1024
    #: A record Kafka has not acknowledged by then is answered 503 with Retry-After.
    delivery_timeout_s: float = 5.0
    #: A client that has not sent its whole body by then gets 408 (slow-client guard).
    body_read_timeout_s: float = 10.0
    retry_after_s: int = 2
    #: Create the project's topics at start (off for clusters where the ingester lacks ACLs).
    create_topics: bool = True
    #: Graceful-shutdown budget: in-flight requests and the producer flush share it.
    shutdown_timeout_s: float = 15.0
    #: Where `GET /postback/receipts/{id}` looks outcomes up (None: lookup answers 503).
    clickhouse_url: str | None = None
    clickhouse_database: str = "postback"


#: Clicks are kept this many days past the longest attribution window, so that a conversion
#: shortly after its window is still `expired`, not `no_click`.
CLICK_HORIZON_MARGIN_DAYS = 30


@dataclass(frozen=True)
class ProcessOptions:
    """One faust worker of the processors; `postback process` flags map onto these."""

    #: Partitions of the internal topics; must equal the raw-postbacks and clicks topics'.
    partitions: int = 6
    replication_factor: int = 1
    #: How long a conversion waits for a late click before it is emitted unattributed.
    late_click_wait_s: float = 600.0
    #: faust's web server (stats, health) binds 127.0.0.1 on this port + the worker index.
    web_port: int = 16066
    #: Short sessions let a restarted worker take its partitions back quickly (faust sends no LeaveGroup).
    session_timeout_s: float = 10.0
    #: Offsets are committed this often; a crash replays at most this much (outputs are idempotent).
    commit_interval_s: float = 1.0
    #: Each agent takes up to this many events at a time, waiting at most batch_wait_s for them.
    batch_max: int = 500
    #: The dedupe and attribute agents consume envelopes (each up to ~500 messages): they take at
    #: most this many at a time, so that one batch stays a few thousand postbacks (a crash repeats
    #: at most one batch per agent; a 500-envelope batch after a restart held ~40,000).
    envelope_batch_max: int = 40
    batch_wait_s: float = 0.01
    #: A batch's outputs are retried until acknowledged; each attempt waits at most this long.
    delivery_timeout_s: float = 30.0
    #: A pass over each partition of the dedupe and clicks tables, deleting expired entries,
    #: starts at most this often; it visits `cleanup_chunk` entries per 1 s tick (processors.sweep).
    cleanup_interval_s: float = 600.0
    cleanup_chunk: int = 2000
    #: Clicks are forgotten this long after the click; None: the longest attribution window
    #: of any configured offer plus CLICK_HORIZON_MARGIN_DAYS.
    click_horizon_days: float | None = None

    def click_horizon_ms(self, longest_window_days: int) -> int:
        days = self.click_horizon_days
        if days is None:
            days = longest_window_days + CLICK_HORIZON_MARGIN_DAYS
        return int(days * 86_400_000)


@dataclass(frozen=True)
class SinkOptions:
    """The ClickHouse writer and lifecycle router; `postback sink` flags map onto these."""

    database: str = "postback"
    #: A batch is inserted when it holds this many rows or is this old, whichever comes first.
    max_rows: int = 10_000
    max_age_s: float = 1.0
    #: Backoff while ClickHouse is down: consumption pauses, memory stays bounded by one batch.
    retry_initial_s: float = 0.5
    retry_max_s: float = 15.0
    session_timeout_s: float = 10.0
    #: After SIGTERM, threads still blocked in a Kafka call this long are abandoned (see sinks.service).
    shutdown_grace_s: float = 20.0
    #: Prometheus metrics on 127.0.0.1:PORT (0 = off).
    metrics_port: int = 0
    #: Fault injection for tests: die (exit 86) after the first insert, before committing offsets.
    #: Set from POSTBACK_SINK_FAULT=crash-after-insert; never set in production.
    crash_after_insert: bool = False


@dataclass(frozen=True)
class OutboundOptions:
    """Tuning of the delivery service; `postback outbound run` flags map onto these."""

    #: Pause the retry topic while this many not-yet-due jobs are held in memory (resume below half).
    max_delayed: int = 10_000
    #: An endpoint with this many jobs waiting gets its new conversion jobs parked on the retry topic
    #: (due after `overflow_delay_s`) instead of in memory.
    max_lane_jobs: int = 2_000
    overflow_delay_s: float = 60.0
    #: Last resort: pause the conversions topic while this many jobs wait in ready queues in all
    #: (resume below half).
    max_ready: int = 50_000
    #: Offsets of settled messages are committed this often (and at shutdown).
    commit_interval_s: float = 1.0
    #: An endpoint is reported failing once this many consecutive attempts failed.
    failing_after: int = 5
    #: On SIGTERM, in-flight attempts get this long to finish and settle.
    shutdown_grace_s: float = 15.0
    session_timeout_s: float = 10.0
    #: Where a consumer group without a committed offset starts reading conversions:
    #: "earliest" (every retained conversion is delivered) or "latest" (only new ones).
    conversions_start: str = "earliest"
    #: Prometheus metrics on 127.0.0.1:PORT (0 = off).
    metrics_port: int = 0
    #: How long an unacknowledged settling record is retried before it counts as failed (then again).
    delivery_timeout_s: float = 10.0
