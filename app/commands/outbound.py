"""`postback outbound [run|status]`: deliver conversions to affiliate postback endpoints, and show how it goes."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from app.endpoints import kafka_bootstrap
from postback.config import Settings
from postback.topics import Topics

#: `status` flags an endpoint FAILING once this many of its latest attempts failed in a row.
FAILING_AFTER = 5


def _partners(settings: Settings) -> Any:
    from postback.partners import PartnerConfig, load_partner_config

    return load_partner_config(settings.config_file) if settings.config_file else PartnerConfig.empty()


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from postback.config import OutboundOptions
    from sinks.outbound.delivery import serve

    opts = OutboundOptions(metrics_port=args.metrics_port, conversions_start=args.conversions_start,
                           max_delayed=args.max_delayed, shutdown_grace_s=args.shutdown_grace,
                           commit_interval_s=args.commit_interval, failing_after=FAILING_AFTER,
                           session_timeout_s=args.session_timeout)
    return serve(settings, kafka_bootstrap(settings), _partners(settings), opts)


def read_deliveries(bootstrap: str, topics: Topics, since_ms: int, timeout_s: float = 10.0) -> list[dict]:
    """Every OutboundDelivery record written since `since_ms` (by broker timestamp), oldest first."""
    from confluent_kafka import Consumer, TopicPartition

    from schemas.codec import Codec, CodecError

    codec = Codec.for_record("OutboundDelivery")
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topics.prefix}-outbound-status",
                         "enable.auto.commit": False, "enable.partition.eof": True})
    name = topics.outbound_deliveries.name
    try:
        meta = consumer.list_topics(name, timeout=timeout_s).topics.get(name)
        if meta is None or meta.error is not None or not meta.partitions:
            return []
        wanted = [TopicPartition(name, p, since_ms) for p in meta.partitions]
        starts = consumer.offsets_for_times(wanted, timeout=timeout_s)
        ends = {}
        assign = []
        for tp in starts:
            _low, high = consumer.get_watermark_offsets(TopicPartition(name, tp.partition), timeout=timeout_s)
            if tp.offset < 0 or tp.offset >= high:
                continue
            ends[tp.partition] = high
            assign.append(TopicPartition(name, tp.partition, tp.offset))
        records: list[dict] = []
        if not assign:
            return records
        consumer.assign(assign)
        left = set(ends)
        deadline = time.monotonic() + timeout_s
        while left and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error():
                    continue
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    left.discard(msg.partition())
                try:
                    records.append(codec.decode(msg.value()))
                except CodecError:
                    continue
        records.sort(key=lambda r: r["attempted_at_ms"])
        return records
    finally:
        consumer.close()


def summarise(records: list[dict], failing_after: int = FAILING_AFTER) -> dict[str, dict[str, Any]]:
    """Per endpoint: attempts, delivered, retrying, dead, consecutive failures (latest first), failing."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        row = out.setdefault(r["endpoint"], {"attempts": 0, "delivered": 0, "retrying": 0, "dead": 0,
                                             "consecutive_failures": 0, "last_error": None})
        row["attempts"] += 1
        outcome = r["outcome"]
        row["delivered" if outcome == "delivered" else "retrying" if outcome == "retry" else "dead"] += 1
        if outcome == "delivered":
            row["consecutive_failures"] = 0
        else:
            row["consecutive_failures"] += 1
            row["last_error"] = r.get("error_class")
    for row in out.values():
        row["failing"] = row["consecutive_failures"] >= failing_after
    return out


def _status(args: argparse.Namespace, settings: Settings) -> int:
    topics = Topics(settings.topic_prefix)
    since = int(time.time() * 1000) - int(args.minutes * 60_000)
    summary = summarise(read_deliveries(kafka_bootstrap(settings), topics, since))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if not summary:
        print(f"no delivery attempts in the last {args.minutes:g} minutes")
        return 0
    print(f"{'endpoint':<40} {'attempts':>8} {'delivered':>9} {'retrying':>8} {'dead':>5} {'consec.fail':>11}")
    for endpoint, row in sorted(summary.items()):
        flag = f"  FAILING ({row['last_error']})" if row["failing"] else ""
        print(f"{endpoint:<40} {row['attempts']:>8} {row['delivered']:>9} {row['retrying']:>8} {row['dead']:>5} "
              f"{row['consecutive_failures']:>11}{flag}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from app.commands.outbound_replay import register_replay

    p = sub.add_parser(
        "outbound", help="deliver conversions to affiliate postback URLs; delivery status; replays",
        description="Deliver every conversion to its affiliate's postback endpoints ($POSTBACK_CONFIG), signed, "
                    "with an Idempotency-Key; show how deliveries go; resend past conversions.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    run = actions.add_parser(
        "run", help="consume conversions and deliver them (a long-running service)",
        description="Consume conversions and send each to the affiliate postback endpoints of $POSTBACK_CONFIG, "
                    "signed, with an Idempotency-Key; retryable failures are retried on the endpoint's schedule "
                    "through the outbound-retry topic, others go to outbound-dead; every attempt is recorded on "
                    "outbound-deliveries. A failing endpoint is flagged, never disabled.")
    run.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics on 127.0.0.1:PORT")
    run.add_argument("--conversions-start", choices=["earliest", "latest"], default="earliest",
                     help="where a new consumer group starts reading conversions (default earliest: every "
                          "retained conversion is delivered)")
    run.add_argument("--max-delayed", type=int, default=10_000,
                     help="pause the retry topic while this many not-yet-due jobs are held (default 10000)")
    run.add_argument("--shutdown-grace", type=float, default=15.0,
                     help="seconds in-flight attempts get to finish on SIGTERM (default 15)")
    run.add_argument("--session-timeout", type=float, default=10.0, help="Kafka group session timeout in seconds")
    run.add_argument("--commit-interval", type=float, default=1.0, help="seconds between offset commits")
    run.set_defaults(handler=_run)
    status = actions.add_parser(
        "status", help="per endpoint: attempts, delivered, retrying, dead, consecutive failures, FAILING",
        description="Read the last --minutes of outbound-deliveries and summarise each endpoint.")
    status.add_argument("--minutes", type=float, default=60.0, help="look back this far (default 60)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)
    register_replay(actions)
