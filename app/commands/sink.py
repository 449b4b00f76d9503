"""`postback sink [run|migrate]`: write conversions, clicks and outcomes to ClickHouse; route lifecycle topics."""

from __future__ import annotations

import argparse
import os

from app.endpoints import clickhouse_url, kafka_bootstrap
from postback.config import Settings, SinkOptions


def _sink(args: argparse.Namespace, settings: Settings) -> int:
    from sinks.service import migrate, serve

    opts = SinkOptions(database=args.database, max_rows=args.batch_rows, max_age_s=args.batch_seconds,
                       metrics_port=args.metrics_port,
                       crash_after_insert=os.environ.get("POSTBACK_SINK_FAULT") == "crash-after-insert")
    if args.action == "migrate":
        applied = migrate(clickhouse_url(settings), args.database)
        print(f"applied migrations: {applied or 'none (up to date)'}")
        return 0
    return serve(settings, kafka_bootstrap(settings), clickhouse_url(settings), opts, args.only)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sink", help="write to ClickHouse and the lifecycle topics (or apply the ClickHouse migrations)",
        description="run (default): consume conversions, clicks, rejections and duplicates and insert them into "
                    "ClickHouse in batches (idempotent: a deterministic insert_deduplication_token per batch, "
                    "ReplacingMergeTree tables, offsets committed only after the insert), and route attributed "
                    "conversions to the lifecycle topics in Kafka transactions. migrate: apply the versioned "
                    "ClickHouse schema (idempotent). ClickHouse is CLICKHOUSE_URL, else the local stack's "
                    "server, else the embedded chdb engine under the state directory.")
    p.add_argument("action", nargs="?", choices=["run", "migrate"], default="run")
    p.add_argument("--only", choices=["clickhouse", "lifecycle"], help="run just one of the two")
    p.add_argument("--database", default="postback", help="ClickHouse database (default postback)")
    p.add_argument("--batch-rows", type=int, default=10_000, help="insert when a batch holds this many rows")
    p.add_argument("--batch-seconds", type=float, default=1.0, help="... or is this old (default 1.0)")
    p.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on 127.0.0.1:PORT")
    p.set_defaults(handler=_sink)


def _trace(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from postback.clickhouse import client_factory
    from sinks.queries import PAYOUT_COLUMNS, describe_delivery, describe_payout, trace

    journey = trace(client_factory(clickhouse_url(settings), args.database)(), args.id)
    if args.json:
        print(json.dumps(journey, default=str, indent=2))
    else:
        for section, rows in journey.items():
            print(f"{section} ({len(rows)})")
            for row in rows:
                if section == "payouts":
                    print("  " + describe_payout(row))
                    continue
                if section == "deliveries":
                    print("  " + describe_delivery(row))
                    continue
                hidden = PAYOUT_COLUMNS if section == "conversions" else ()  # shown per version under payouts
                shown = {k: v for k, v in row.items() if v not in (None, "", {}, []) and k not in hidden}
                print("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0 if any(journey.values()) else 1


def register_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="show a click's, order's or receipt's journey from ClickHouse",
                       description="Print everything ClickHouse knows about an id: the click, each postback's "
                                   "outcome (accepted, duplicate, rejected and why), the conversion rows, and for "
                                   "each conversion version its payout (amount and currency, status and reason, "
                                   "rule, the FX rates and dates used, fx_status, cap decision), and each "
                                   "outbound postback attempt to the affiliate's endpoints (endpoint, attempt, "
                                   "outcome, HTTP status, latency, error class, time, URL with secrets redacted). "
                                   "Exit 1 when nothing is found.")
    p.add_argument("id", help="a click ID, order ID, receipt ID or conversion ID")
    p.add_argument("--database", default="postback")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_trace)
