"""`postback partners explain`: how a given postback would be read (see `app.explain`)."""

from __future__ import annotations

import argparse
import json
import sys

from postback.config import Settings
from postback.partners import load_partner_config
from postback.topics import Topics

_EPILOG = """\
examples:
  postback partners explain keitaro-shop \\
      'https://postbacks.example.com/postback?advertiser_id=keitaro-shop&subid=01J0...&status=sale&payout=10&token=...'
  postback partners explain acme 'advertiser_id=acme&event=purchase&order_id=A-1&amount=9.90&currency=EUR&ts=...&sig=...'

Nothing is sent. The timestamp of a signed postback is checked against the current time,
so a URL signed long ago is explained as stale_timestamp. No secret or token is printed."""


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of partitions >= 1, got {text!r}")
    return n


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from app.explain import explain, render

    path = args.config or settings.config_file
    if path is None:
        print("postback partners explain: no partner file: set POSTBACK_CONFIG or pass --config", file=sys.stderr)
        return 2
    partners = load_partner_config(path)
    try:
        result = explain(partners, args.advertiser, args.postback, args.partitions, dict(args.header))
    except ValueError as exc:  # an advertiser that is not configured: a usage error, not a refused postback
        print(f"postback partners explain: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return 0 if result.ingest_status == 202 and result.outcome.get("outcome") != "rejection" else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("partners", help="inspect the partner configuration ($POSTBACK_CONFIG)",
                       description="Inspect how the partner file reads advertisers' postbacks.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser(
        "explain", help="show how one postback URL would be read, step by step",
        description="Show how one GET postback would be read by ADVERTISER's configuration, as the ingester and "
                    "the processors read it: the ingester's answer, every parameter with its alias and the "
                    "defaults used, the authentication used and its verdict, the event, status and amount, the "
                    "dedupe key and conversion id, and the Kafka key and partition of the raw record. Exit "
                    "status 0 when it would become a conversion, 1 when it would be refused or rejected.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("advertiser", metavar="ADVERTISER", help="advertiser id in the partner file")
    e.add_argument("postback", metavar="URL_OR_QUERY", help="the postback URL, or just its query string")
    e.add_argument("--header", action="append", type=_header, default=[], metavar="'NAME: VALUE'",
                   help="a request header, e.g. the advertiser's token_header (repeatable)")
    e.add_argument("--config", help="partner TOML file (default $POSTBACK_CONFIG)")
    default_partitions = Topics().raw_postbacks.partitions
    e.add_argument("--partitions", type=_positive, default=default_partitions,
                   help=f"partitions of the raw-postbacks topic (default {default_partitions})")
    e.add_argument("--json", action="store_true", help="print the explanation as JSON")
    e.set_defaults(handler=_explain)
