"""`postback process`: run the verify -> dedupe -> attribute workers."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.endpoints import kafka_bootstrap
from postback.config import ProcessOptions, Settings


def _process(args: argparse.Namespace, settings: Settings) -> int:
    from processors.worker import serve

    opts = ProcessOptions(late_click_wait_s=args.late_click_wait, web_port=args.web_port,
                          session_timeout_s=args.session_timeout, partitions=args.partitions,
                          cleanup_interval_s=args.cleanup_interval, click_horizon_days=args.click_horizon_days)
    data_root = Path(args.data_dir) if args.data_dir else settings.state_dir / "processors"
    return serve(settings, kafka_bootstrap(settings), opts, args.workers, data_root, args.loglevel.upper())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "process", help="run the processors: verify signatures, dedupe, attribute (faust workers)",
        description="Consume raw postbacks and clicks, verify each postback's signature or token, deduplicate "
                    "by order ID in RocksDB tables, attribute conversions to clicks, and write every receipt's "
                    "outcome to the conversions, rejections or duplicates topic (at-least-once, idempotent). "
                    "Partner configuration comes from $POSTBACK_CONFIG.")
    p.add_argument("--workers", type=int, default=1, help="worker processes in this consumer group (default 1)")
    p.add_argument("--web-port", type=int, default=16066,
                   help="faust web port of worker 0 on 127.0.0.1; worker i uses PORT+i (default 16066)")
    p.add_argument("--late-click-wait", type=float, default=600.0,
                   help="seconds a conversion waits for its click before it is emitted unattributed (default 600)")
    p.add_argument("--cleanup-interval", type=float, default=600.0, metavar="S",
                   help="start a pass over each partition of the dedupe and clicks tables, deleting entries past "
                        "their horizon, at most every S seconds; a pass visits 2,000 entries per second per "
                        "partition, so it never blocks the worker for long (default 600)")
    p.add_argument("--click-horizon-days", type=float, default=None, metavar="D",
                   help="forget clicks D days after the click (default: the longest attribution window of any "
                        "offer in $POSTBACK_CONFIG plus 30 days; a conversion for a forgotten click is "
                        "emitted unattributed, `no_click`, instead of `expired`)")
    p.add_argument("--session-timeout", type=float, default=10.0, help="Kafka group session timeout in seconds")
    p.add_argument("--partitions", type=int, default=6, help="partitions of the internal topics (default 6)")
    p.add_argument("--data-dir", help="RocksDB state root (default <state-dir>/processors)")
    p.add_argument("--loglevel", default="warning", help="faust log level (default warning)")
    p.set_defaults(handler=_process)
