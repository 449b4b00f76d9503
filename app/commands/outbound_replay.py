"""`postback outbound replay`: send an affiliate's outbound postbacks again, through the delivery service.

What it does: reads the latest version of each of the affiliate's attributed conversions
from ClickHouse (`conversions FINAL`; optionally one offer, a time range by event time or
by receipt time), renders the request of every matching endpoint of the partner config
(`PartnerConfig.affiliate(A).postbacks`, with the endpoint's offer/event/status filters,
`sinks.outbound.request.build_request`), and

- with `--dry-run`: prints how many requests would be sent and the first 10 URLs, redacted
  (`OutboundRequest.redacted_url`); nothing is produced and no state is written;
- otherwise: produces one attempt-1 job per request to the `outbound-retry` topic, keyed by
  the endpoint id, `not_before_ms` = now, in the job format of the delivery service
  (`sinks.outbound.delivery`). The running `postback outbound run` sends them with the
  same `Idempotency-Key` (`<conversion_id>:<version>`) as the original delivery.

Resumable without resending what succeeded:

- a request whose idempotency key already has a `delivered` row in `outbound_deliveries`
  for that endpoint is skipped (also in a dry run, so its count is what would be sent);
- conversions are read in `conversion_id` order, in batches; after Kafka acknowledged a
  batch's jobs, the last conversion_id is saved in a state file
  (`<state dir>/outbound-replay/<affiliate>-<hash of the options>.json`). `--resume`
  continues after it; without `--resume` a replay starts from the beginning.

Exit status: 0 when done (also when there was nothing to send), 1 when requests could not
be rendered (counted and reported; the rest are still sent), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from postback.config import Settings
from postback.partner_model import OutboundEndpoint, PartnerConfig

__all__ = ["DRY_RUN_SHOWN", "ReplayOptions", "ReplayResult", "delivered_keys", "job_json", "parse_time",
           "register_replay", "replay", "select_conversions", "state_path"]

#: How many rendered URLs a dry run prints.
DRY_RUN_SHOWN = 10
#: The conversion fields a replayed job carries: every macro's source, plus what endpoint matching reads.
JOB_FIELDS = ("conversion_id", "version", "advertiser_id", "affiliate_id", "offer_id", "click_id", "sub1", "sub2",
              "sub3", "sub4", "sub5", "event", "status", "order_id", "payout", "payout_currency", "event_time_ms",
              "received_at_ms", "attributed")


@dataclass(frozen=True)
class ReplayOptions:
    """Which conversions and endpoints a replay covers; `from_ms`/`to_ms` bound `[from, to)`."""

    affiliate: str
    offer: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None
    by: str = "event"  # "event": event time, else receipt time; "received": receipt time
    endpoint: str | None = None  # an endpoint name of the affiliate, or its endpoint id
    database: str = "postback"

    def key(self) -> str:
        """A short hash of the options: which state file belongs to this replay."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class ReplayResult:
    conversions: int = 0
    requests: int = 0  # rendered requests, skipped ones included
    queued: int = 0  # jobs produced (or, in a dry run, that would be)
    skipped_delivered: int = 0
    unrenderable: int = 0
    last_conversion_id: str | None = None
    shown: list[str] = field(default_factory=list)  # dry run: the first redacted URLs


def parse_time(text: str) -> int:
    """An ISO date or date-time (UTC unless it names an offset) as epoch milliseconds."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def endpoints(partners: PartnerConfig, opts: ReplayOptions) -> list[OutboundEndpoint]:
    """The affiliate's endpoints this replay sends to; ValueError naming what is missing."""
    affiliate = partners.affiliate(opts.affiliate)
    if affiliate is None:
        raise ValueError(f"affiliate {opts.affiliate!r} is not in the partner config")
    found = list(affiliate.postbacks.values())
    if opts.endpoint is not None:
        found = [ep for ep in found if opts.endpoint in (ep.name, ep.endpoint_id)]
        if not found:
            names = ", ".join(affiliate.postbacks) or "none"
            raise ValueError(f"affiliate {opts.affiliate!r} has no postback endpoint {opts.endpoint!r} "
                             f"(configured: {names})")
    elif not found:
        raise ValueError(f"affiliate {opts.affiliate!r} has no postback endpoints configured")
    return found


def _query_rows(client: Any, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    result = client.query(sql, parameters=params)
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


def select_conversions(client: Any, opts: ReplayOptions, after: str | None, limit: int) -> list[dict[str, Any]]:
    """The next `limit` conversions (latest versions, attributed to the affiliate) after `after`, by conversion_id.

    The filters apply to the latest version (WHERE after FINAL), so a conversion re-attributed
    away from the affiliate is not replayed to it.
    """
    when = ("coalesce(event_time, received_at)" if opts.by == "event" else "received_at")
    where = ["affiliate_id = {a:String}", "attributed"]
    params: dict[str, Any] = {"a": opts.affiliate}
    if opts.offer is not None:
        where.append("offer_id = {o:String}")
        params["o"] = opts.offer
    if opts.from_ms is not None:
        where.append(f"toUnixTimestamp64Milli({when}) >= {{f:Int64}}")
        params["f"] = opts.from_ms
    if opts.to_ms is not None:
        where.append(f"toUnixTimestamp64Milli({when}) < {{t:Int64}}")
        params["t"] = opts.to_ms
    if after is not None:
        where.append("conversion_id > {after:String}")
        params["after"] = after
    sql = ("SELECT conversion_id, version, advertiser_id, affiliate_id, offer_id, click_id, sub1, sub2, sub3, sub4, "
           "sub5, event, status, order_id, payout, payout_currency, "
           "toUnixTimestamp64Milli(event_time) AS event_time_ms, "
           "toUnixTimestamp64Milli(received_at) AS received_at_ms, attributed "
           f"FROM conversions FINAL WHERE {' AND '.join(where)} ORDER BY conversion_id LIMIT {int(limit)}")
    rows = _query_rows(client, sql, params)
    for row in rows:
        row["version"] = int(row["version"])
        row["attributed"] = bool(row["attributed"])
    return rows


def delivered_keys(client: Any, conversion_ids: Sequence[str], endpoint_ids: Sequence[str]) -> set[tuple[str, str]]:
    """`(endpoint_id, idempotency_key)` pairs among these conversions that were already delivered."""
    if not conversion_ids or not endpoint_ids:
        return set()
    rows = client.query("SELECT DISTINCT endpoint, idempotency_key FROM outbound_deliveries FINAL "
                        "WHERE conversion_id IN {c:Array(String)} AND endpoint IN {e:Array(String)} "
                        "AND outcome = 'delivered'",
                        parameters={"c": list(conversion_ids), "e": list(endpoint_ids)}).result_rows
    return {(str(e), str(k)) for e, k in rows}


def _json_value(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


def job_json(endpoint_id: str, conversion: Mapping[str, Any], now_ms: int) -> bytes:
    """An attempt-1 job of the outbound-retry topic (contract: endpoint, conversion, attempt, times, last_error)."""
    body = {"endpoint": endpoint_id,
            "conversion": {k: _json_value(conversion.get(k)) for k in JOB_FIELDS},
            "attempt": 1, "not_before_ms": now_ms, "first_attempt_ms": now_ms, "last_error": ""}
    return json.dumps(body, separators=(",", ":")).encode()


def state_path(state_dir: Path, opts: ReplayOptions) -> Path:
    """Where a replay with these options keeps its progress."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in opts.affiliate)[:64]
    return state_dir / "outbound-replay" / f"{safe}-{opts.key()}.json"


def _load_state(path: Path, opts: ReplayOptions) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if state.get("options") != asdict(opts):
        return None
    return state


def _save_state(path: Path, opts: ReplayOptions, result: ReplayResult, done: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"options": asdict(opts), "last_conversion_id": result.last_conversion_id, "queued": result.queued,
             "skipped_delivered": result.skipped_delivered, "done": done,
             "updated_at": datetime.now(UTC).isoformat(timespec="seconds")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a crash never leaves a half-written state file


class _Producer:
    """The Kafka side of a replay: produce jobs keyed by endpoint, and wait for every acknowledgement."""

    def __init__(self, producer: Any, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.errors: list[str] = []

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def send(self, key: str, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value, key.encode(), on_delivery=self._delivered)
                return
            except BufferError:  # local queue full: let it drain
                self.producer.poll(0.1)

    def flush(self, timeout: float = 60.0) -> None:
        left = self.producer.flush(timeout)
        if left or self.errors:
            raise RuntimeError(f"Kafka did not acknowledge {left} jobs"
                               + (f": {self.errors[0]}" if self.errors else ""))


def replay(client: Any, partners: PartnerConfig, opts: ReplayOptions, *, producer: Any = None,
           topic: str | None = None, state_dir: Path | None = None, resume: bool = False, dry_run: bool = False,
           batch_size: int = 500, out: Callable[[str], Any] = print, now_ms: Callable[[], int] | None = None
           ) -> ReplayResult:
    """Run one replay (see the module doc). `producer`/`topic`/`state_dir` are needed unless `dry_run`."""
    clock = now_ms or (lambda: time.time_ns() // 1_000_000)
    targets = endpoints(partners, opts)
    target_ids = [ep.endpoint_id for ep in targets]
    sink = None if dry_run else _Producer(producer, topic or "")
    path = state_path(state_dir, opts) if state_dir is not None else None
    result = ReplayResult()
    after: str | None = None
    if resume and path is not None:
        state = _load_state(path, opts)
        if state is None:
            out(f"no saved progress for this replay in {path}; starting from the beginning")
        else:
            after = state.get("last_conversion_id")
            result.queued = int(state.get("queued") or 0)
            result.skipped_delivered = int(state.get("skipped_delivered") or 0)
            if state.get("done"):
                out(f"this replay already finished ({result.queued} jobs queued); nothing to do")
                result.last_conversion_id = after
                return result
            out(f"resuming after conversion {after} ({result.queued} jobs queued before)")
    while True:
        batch = select_conversions(client, opts, after, batch_size)
        if not batch:
            break
        done_keys = delivered_keys(client, [c["conversion_id"] for c in batch], target_ids)
        now = clock()
        for conversion in batch:
            result.conversions += 1
            for endpoint in targets:
                if not endpoint.matches(conversion):
                    continue
                result.requests += 1
                try:
                    request = _build(endpoint, conversion, now // 1000)
                except ValueError as exc:
                    result.unrenderable += 1
                    out(f"cannot render {conversion['conversion_id']} for {endpoint.endpoint_id}: {exc}")
                    continue
                key = f"{conversion['conversion_id']}:{conversion['version']}"
                if (endpoint.endpoint_id, key) in done_keys:
                    result.skipped_delivered += 1
                    continue
                result.queued += 1
                if sink is None:
                    if len(result.shown) < DRY_RUN_SHOWN:
                        result.shown.append(f"{endpoint.endpoint_id} {request.method} {request.redacted_url}")
                else:
                    sink.send(endpoint.endpoint_id, job_json(endpoint.endpoint_id, conversion, now))
        after = result.last_conversion_id = batch[-1]["conversion_id"]
        if sink is not None:
            sink.flush()
            if path is not None:
                _save_state(path, opts, result, done=False)
        out(f"{opts.affiliate}: {result.conversions} conversions read, {result.queued} "
            f"{'would be queued' if dry_run else 'jobs queued'}, {result.skipped_delivered} already delivered, "
            f"last {after}")
        if len(batch) < batch_size:
            break
    if sink is not None and path is not None:
        _save_state(path, opts, result, done=True)
    return result


def _build(endpoint: OutboundEndpoint, conversion: Mapping[str, Any], now_s: int) -> Any:
    from sinks.outbound.request import build_request

    return build_request(endpoint, conversion, now_s)


def _options(args: argparse.Namespace) -> ReplayOptions:
    return ReplayOptions(affiliate=args.affiliate, offer=args.offer, from_ms=args.from_ms, to_ms=args.to_ms,
                         by=args.by, endpoint=args.endpoint, database=args.database)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from confluent_kafka import Producer

    from app.endpoints import clickhouse_url, kafka_bootstrap
    from postback.clickhouse import client_factory
    from postback.kafka import producer_config
    from postback.partners import load_partner_config
    from postback.topics import Topics

    if settings.config_file is None:
        print("outbound replay: no partner config (set POSTBACK_CONFIG)")
        return 2
    opts = _options(args)
    if opts.from_ms is not None and opts.to_ms is not None and opts.from_ms >= opts.to_ms:
        print("outbound replay: --from must be before --to")
        return 2
    partners = load_partner_config(settings.config_file)
    client = client_factory(clickhouse_url(settings), args.database)()
    producer = topic = None
    if not args.dry_run:
        producer = Producer(producer_config(kafka_bootstrap(settings), 30.0))
        topic = Topics(settings.topic_prefix).outbound_retry.name
    try:
        result = replay(client, partners, opts, producer=producer, topic=topic, state_dir=settings.state_dir,
                        resume=args.resume, dry_run=args.dry_run, batch_size=args.batch)
    except ValueError as exc:
        print(f"outbound replay: {exc}")
        return 2
    if args.dry_run:
        print(f"dry run: {result.queued} requests would be sent ({result.conversions} conversions, "
              f"{result.skipped_delivered} already delivered, {result.unrenderable} not renderable)")
        for line in result.shown:
            print("  " + line)
    else:
        print(f"queued {result.queued} jobs on {topic} ({result.conversions} conversions read, "
              f"{result.skipped_delivered} already delivered, {result.unrenderable} not renderable); "
              f"progress in {state_path(settings.state_dir, opts)}")
    return 1 if result.unrenderable else 0


def register_replay(actions: argparse._SubParsersAction) -> None:
    """Add the `replay` action to `postback outbound`'s actions."""
    p = actions.add_parser(
        "replay", help="send an affiliate's postbacks again (skipping those already delivered)",
        description="Read the latest version of each of an affiliate's attributed conversions from ClickHouse "
                    "(conversions FINAL), render each request with the affiliate's postback endpoints, and queue "
                    "attempt-1 jobs on the outbound-retry topic for the running delivery service, which sends them "
                    "with the same Idempotency-Key as before. Requests already delivered to the endpoint (a "
                    "'delivered' row in outbound_deliveries) are skipped. Progress is saved under the state "
                    "directory after each batch; --resume continues an interrupted replay with the same options. "
                    "Times are ISO dates or date-times, UTC unless an offset is given; the range is [--from, --to).")
    p.add_argument("--affiliate", required=True, help="the affiliate id")
    p.add_argument("--offer", help="only this offer's conversions")
    p.add_argument("--from", dest="from_ms", type=parse_time, metavar="T", help="from this time (inclusive)")
    p.add_argument("--to", dest="to_ms", type=parse_time, metavar="T", help="until this time (exclusive)")
    p.add_argument("--by", choices=["event", "received"], default="event",
                   help="range over the event time (default; the receipt time when there is none) or the receipt time")
    p.add_argument("--endpoint", help="only this endpoint (its name, or <affiliate>/<name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the count and the first 10 URLs (redacted); send nothing")
    p.add_argument("--resume", action="store_true", help="continue the last replay with the same options")
    p.add_argument("--database", default="postback", help="ClickHouse database (default postback)")
    p.add_argument("--batch", type=int, default=500, help="conversions per batch (default 500)")
    p.set_defaults(handler=_replay)
