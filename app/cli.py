"""The `postback` command line: one entry point, a subcommand per job.

Every subcommand has `--help`. Commands that need Kafka or ClickHouse use
`KAFKA_BOOTSTRAP_SERVERS` / `CLICKHOUSE_URL` when set, else the local stack started by
`postback stack up` (see `app.endpoints`). Each subcommand lives in `app.commands` (the
demo in `app.demo`).
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


# -- entry point ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postback",
        description="postback-pipeline: S2S conversion postbacks through Kafka into ClickHouse.",
    )
    parser.add_argument("--version", action="version", version=f"postback-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from app import demo
    from app.commands import fx, ingest, outbound, partners, process, run, sign, sink, stack

    stack.register(sub)
    ingest.register(sub)
    process.register(sub)
    sign.register(sub)
    sink.register(sub)
    sink.register_trace(sub)
    run.register(sub)
    demo.register(sub)
    partners.register(sub)
    fx.register(sub)
    outbound.register(sub)
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
