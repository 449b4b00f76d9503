"""`postback stack up|down|status|fetch`: the local Kafka + ClickHouse stack (see `deploy.stack`)."""

from __future__ import annotations

import argparse

from postback.config import Settings


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


def register(sub: argparse._SubParsersAction) -> None:
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
