"""`postback ingest` (run the HTTP ingester) and `postback send` (try it like a partner would)."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.parse
import urllib.request

from app.endpoints import kafka_bootstrap, served_clickhouse_url
from postback.config import IngestOptions, Settings


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.server import serve
    from sinks.queries import receipt_outcome

    opts = IngestOptions(host=args.host, port=args.port, workers=args.workers,
                         max_body_bytes=args.max_body_bytes, delivery_timeout_s=args.delivery_timeout,
                         body_read_timeout_s=args.body_read_timeout, create_topics=not args.no_create_topics,
                         clickhouse_url=served_clickhouse_url(settings), clickhouse_database=args.clickhouse_database)
    return serve(opts, settings, kafka_bootstrap(settings), receipt_lookup=receipt_outcome)


def _pairs(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param expects KEY=VALUE, got {item!r}")
        out.append((key, value))
    return out


def _send(args: argparse.Namespace, settings: Settings) -> int:
    base = args.url.rstrip("/")
    if args.kind == "click":
        params = [("offer_id", args.offer_id), ("affiliate_id", args.affiliate_id)] + _pairs(args.param)
        request = urllib.request.Request(f"{base}/click?{urllib.parse.urlencode(params)}")
    else:
        fields = {"advertiser_id": args.advertiser_id, "event": args.event, "click_id": args.click_id,
                  "order_id": args.order_id, "amount": args.amount, "currency": args.currency}
        params = [(k, val) for k, val in fields.items() if val is not None] + _pairs(args.param)
        if args.json:
            body = json.dumps(dict(params)).encode()
            request = urllib.request.Request(f"{base}/postback", data=body,
                                             headers={"Content-Type": "application/json"})
        else:
            request = urllib.request.Request(f"{base}/postback", data=urllib.parse.urlencode(params).encode(),
                                             headers={"Content-Type": "application/x-www-form-urlencoded"})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):  # show the 302 instead of following it
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=args.timeout) as resp:
            status, body, location = resp.status, resp.read().decode(), resp.headers.get("Location")
    except urllib.error.HTTPError as err:
        status, body, location = err.code, err.read().decode(), err.headers.get("Location")
    print(f"HTTP {status}" + (f" -> {location}" if location else ""))
    if body:
        print(body)
    return 0 if status in (200, 202, 302) else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest", help="run the HTTP ingester (clicks and postbacks into Kafka)",
        description="Serve GET /click, POST /clicks, GET|POST /postback, /healthz, /readyz and /metrics. "
                    "Every 202 means Kafka acknowledged the record (idempotent producer, acks=all); 503 with "
                    "Retry-After means it did not. Partner configuration comes from $POSTBACK_CONFIG (TOML).")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port, 0 = ephemeral (default 8080)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port via SO_REUSEPORT (default 1)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="postback body limit (default 65536)")
    p.add_argument("--delivery-timeout", type=float, default=5.0,
                   help="seconds to wait for Kafka's acknowledgement before answering 503 (default 5)")
    p.add_argument("--body-read-timeout", type=float, default=10.0,
                   help="seconds a client may take to send its body before 408 (default 10)")
    p.add_argument("--clickhouse-database", default="postback", help="database for receipt lookups")
    p.add_argument("--no-create-topics", action="store_true", help="do not create missing topics at start")
    p.set_defaults(handler=_ingest)

    s = sub.add_parser("send", help="send a test click or postback to a running ingester",
                       description="Send one click or postback like a partner's server would, and print the "
                                   "answer. Use it to wire up a partner or smoke-test a deployment.")
    s.add_argument("kind", choices=["click", "postback"])
    s.add_argument("--url", default="http://127.0.0.1:8080", help="ingester base URL")
    s.add_argument("--offer-id", default="offer-1")
    s.add_argument("--affiliate-id", default="aff-1")
    s.add_argument("--advertiser-id", default="acme")
    s.add_argument("--event", default="purchase")
    s.add_argument("--click-id")
    s.add_argument("--order-id")
    s.add_argument("--amount")
    s.add_argument("--currency")
    s.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="extra parameter (repeatable)")
    s.add_argument("--json", action="store_true", help="POST a JSON body instead of a form")
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(handler=_send)
