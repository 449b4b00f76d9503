"""The `postback` command line: one entry point, a subcommand per job.

Every subcommand has `--help`. Commands that need Kafka or ClickHouse use
`KAFKA_BOOTSTRAP_SERVERS` / `CLICKHOUSE_URL` when set, else the local stack started by
`postback stack up` (see `deploy.stack`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from postback import __version__
from postback.config import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    if getattr(args, "state_dir", None):
        settings = replace(settings, state_dir=Path(args.state_dir).absolute())
    return settings


# -- stack ---------------------------------------------------------------------------
def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from deploy.clickhouse_local import ClickHouseOptions
    from deploy.kafka_local import KafkaOptions
    from deploy.stack import Stack, status_json

    stack = Stack(
        settings,
        KafkaOptions(port=args.kafka_port, controller_port=args.kafka_controller_port, heap_mb=args.kafka_heap_mb),
        ClickHouseOptions(http_port=args.clickhouse_http_port, tcp_port=args.clickhouse_tcp_port),
    )
    say = (lambda _m: None) if args.json else (lambda m: print(m, flush=True))
    if args.action == "fetch":
        from deploy.kafka_jars import ensure_jars

        print(ensure_jars(settings.cache_dir, settings.kafka_version, say))
        return 0
    statuses = {"up": stack.up, "down": stack.down}.get(args.action, lambda progress: stack.status())(progress=say)
    if args.json:
        print(status_json(statuses))
    else:
        print(f"state directory: {settings.state_dir}")
        for status in statuses:
            print("  " + status.line())
    if args.action == "up" and any(s.state not in ("running", "external") for s in statuses):
        return 1
    return 0


def _add_stack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stack",
        help="start, stop or inspect the local Kafka + ClickHouse stack",
        description=(
            "Manage the local stack: Apache Kafka (KRaft, jars from Maven Central via mvn, cached per user) "
            "and ClickHouse (served from the chdb-core wheel) on 127.0.0.1. State, data and logs live under "
            "--state-dir. With KAFKA_BOOTSTRAP_SERVERS or CLICKHOUSE_URL set, that service is external: "
            "never started or stopped here, only checked."
        ),
    )
    p.add_argument("action", choices=["up", "down", "status", "fetch"],
                   help="up: start what is not running (idempotent); down: stop; status: what runs where; "
                        "fetch: only download the Kafka jars (once, into the per-user cache)")
    p.add_argument("--state-dir", help="state directory (default $POSTBACK_STATE_DIR or ./.postback)")
    p.add_argument("--kafka-port", type=int, default=19092, help="Kafka client port, 0 = ephemeral (default 19092)")
    p.add_argument("--kafka-controller-port", type=int, default=19093, help="KRaft controller port (default 19093)")
    p.add_argument("--kafka-heap-mb", type=int, default=768, help="broker JVM heap in MiB (default 768)")
    p.add_argument("--clickhouse-http-port", type=int, default=18123, help="ClickHouse HTTP port (default 18123)")
    p.add_argument("--clickhouse-tcp-port", type=int, default=19000, help="ClickHouse native port (default 19000)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=_stack)


# -- entry point ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postback",
        description="postback-pipeline: S2S conversion postbacks through Kafka into ClickHouse.",
    )
    parser.add_argument("--version", action="version", version=f"postback-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_stack(sub)
    from ingest import cli as ingest_cli
    from postback import demo, run
    from processors import cli as processors_cli
    from processors import sign_cli

    ingest_cli.register(sub)
    processors_cli.register(sub)
    sign_cli.register(sub)
    from sinks import cli as sinks_cli

    sinks_cli.register(sub)
    sinks_cli.register_trace(sub)
    run.register(sub)
    demo.register(sub)
    from app import partners_cli

    partners_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        return handler(args, _settings(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - top level: one clear line, not a traceback
        if args.verbose:
            raise
        print(f"postback {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
