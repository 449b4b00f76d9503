"""`postback fx load FILE`: publish the operator's FX rates to the compacted fx-rates topic.

Why a topic: every processor worker reads the whole topic into memory (`processors.fx_feed`)
and keeps following it, and the ClickHouse sink writes it to `fx_rates`, so one load
reaches the payout engine and the analysts alike, and a restart or a new worker finds the
same rates. The topic is compacted by `currency|date`: loading a corrected rate for a day
replaces it.

Guarantee: the command returns 0 only after Kafka acknowledged every rate (idempotent
producer, acks=all). A file with any bad line publishes nothing and names the line.

`postback fx backfill`: recompute the conversions that waited for a rate. A conversion
processed before its currency's rate was loaded carries `fx_status = fx_missing` (never a
silent 0 or 1). This finds them in ClickHouse (`conversions FINAL`, the latest row of
each) and sends one message `{"backfill": conversion_id}` per conversion to the internal
processor-commission topic, in envelopes, on the partition of its commission key
(`advertiser_id`: `murmur2(key) % partitions`, the placement the
processors' own publisher uses), so it reaches the worker holding that advertiser's commission
table. There `processors.commission.recompute_fx` recomputes it with the rates now known
and the processors emit a new Conversion record with the same version, which replaces the
`fx_missing` row in ClickHouse. A conversion whose rate is still missing is left as it is
(load the rate and run the backfill again); running it twice is harmless (a conversion
already recomputed is emitted again identically). Returns 0 once Kafka acknowledged every
message (idempotent producer, acks=all); the records appear as the processors get to them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from app.endpoints import clickhouse_url, kafka_bootstrap
from postback.config import Settings
from postback.fx import FxRate

log = logging.getLogger("postback.fx")

_EPILOG = """\
file format (CSV, UTF-8, with a header):
  date,currency,rate
  2026-12-01,EUR,1.0850
  2026-12-01,GBP,1.2710

rate = units of the account's reporting currency ([account] reporting_currency in the
partner file) for 1 unit of `currency`. A conversion uses the newest rate on or before its
event date; with none it carries fx_status = fx_missing (never a silent 0 or 1)."""


def publish_rates(bootstrap: str, prefix: str, rates: Sequence[FxRate], reporting_currency: str,
                  timeout_s: float = 30.0) -> int:
    """Publish `rates` to the fx-rates topic (created if missing); how many were NOT acknowledged.

    Keyed `currency|date` on a compacted topic, so publishing a rate again replaces it.
    """
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient

    from postback.kafka import producer_config
    from postback.topics import Topics, ensure_topics
    from schemas.codec import Codec

    topic = Topics(prefix).fx_rates
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic])
    codec = Codec.for_record("FxRate")
    producer = Producer(producer_config(bootstrap, delivery_timeout_s=timeout_s))
    failed: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    now_ms = time.time_ns() // 1_000_000
    for rate in rates:
        record = {"date": rate.date, "currency": rate.currency, "rate": str(rate.rate),
                  "reporting_currency": reporting_currency, "loaded_at_ms": now_ms}
        producer.produce(topic.name, key=f"{rate.currency}|{rate.date}".encode(), value=codec.encode(record),
                         on_delivery=delivered)
        producer.poll(0)
    left = producer.flush(timeout_s)
    if failed:
        log.error("FX rates not acknowledged: %s", failed[0])
    return len(failed) + left


def _load(args: argparse.Namespace, settings: Settings) -> int:
    from postback.fx import FxFileError, parse_fx_csv
    from postback.partners import PartnerConfig, load_partner_config
    from postback.topics import Topics

    path = Path(args.file)
    try:
        rates = parse_fx_csv(path.read_text(encoding="utf-8"), str(path))
    except (OSError, FxFileError) as exc:
        print(f"postback fx load: {exc}", file=sys.stderr)
        return 2
    partners = load_partner_config(settings.config_file) if settings.config_file else PartnerConfig.empty()
    reporting = partners.account.reporting_currency
    unacked = publish_rates(kafka_bootstrap(settings), settings.topic_prefix, rates, reporting, args.timeout)
    if unacked:
        print(f"postback fx load: {unacked} of {len(rates)} rates were not acknowledged by Kafka; run the command "
              "again (loading is idempotent)", file=sys.stderr)
        return 1
    currencies = sorted({r.currency for r in rates})
    days = sorted({r.date for r in rates})
    span = f"{days[0]} .. {days[-1]}" if days else "-"
    print(f"loaded {len(rates)} FX rates to {Topics(settings.topic_prefix).fx_rates.name}: {len(currencies)} "
          f"currencies ({', '.join(currencies)}), {span}, reporting currency {reporting}")
    return 0


_BACKFILL_EPILOG = """\
what it does:
  1. asks ClickHouse for the conversions whose latest row has fx_status = 'fx_missing'
     (SELECT conversion_id, advertiser_id FROM conversions FINAL WHERE fx_status = 'fx_missing');
  2. sends one backfill message per conversion to the processor-commission topic, on the
     partition of its advertiser (the worker holding the caps and tiers of its offers);
  3. the processors recompute each one whose rates are now loaded and emit it again as the
     same version, with fx_status = ok and processed_at = the time of the backfill.

A conversion held with reason fx_missing (its payout needed the rate) is decided again and
may become payable, counted against the offer's caps; any other keeps its payout and only
gains the reporting amounts. Ones whose rate is still missing are left unchanged: load the
rate (postback fx load FILE), then run the backfill again. Running it twice is harmless.

examples:
  postback fx load rates.csv && postback fx backfill
  postback fx backfill --dry-run          # only count the conversions waiting for a rate"""

#: Messages per flush while sending (progress is printed after each).
BACKFILL_CHUNK = 10_000


def backfill_envelopes(pairs: Sequence[tuple[str, str | None]], partitions: int) -> list[tuple[int, bytes]]:
    """(conversion_id, advertiser_id) pairs -> [(partition, envelope)] of backfill messages for the commission topic.

    Each message goes where the processors put the conversion itself: the partition of its
    commission key (`processors.handlers.commission_key`) by Java's murmur2.
    """
    from confluent_kafka import murmur2

    from processors.handlers import BACKFILL, commission_key
    from processors.runtime.publish import encode_envelopes
    from processors.stages import encode_internal

    items = [(murmur2(commission_key({"advertiser_id": advertiser_id, "conversion_id": cid}).encode(), partitions),
              encode_internal({BACKFILL: cid})) for cid, advertiser_id in pairs]
    return encode_envelopes(items)


def publish_backfill(bootstrap: str, topic: str, pairs: Sequence[tuple[str, str | None]], timeout_s: float = 30.0,
                     progress: Callable[[str], Any] = print) -> int:
    """Send a backfill message for every (conversion_id, advertiser_id) to the commission `topic`.

    Returns how many Kafka did not acknowledge (0: all sent). Raises RuntimeError when the
    topic does not exist (the processors' topics are created by `postback process`).
    """
    from confluent_kafka import Producer

    from postback.kafka import producer_config

    producer = Producer(producer_config(bootstrap, delivery_timeout_s=timeout_s))
    metadata = producer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise RuntimeError(f"the commission topic {topic} does not exist (start the processors once first)")
    partitions = len(metadata.partitions)
    failed: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    sent = 0
    for start in range(0, len(pairs), BACKFILL_CHUNK):
        chunk = pairs[start:start + BACKFILL_CHUNK]
        for partition, envelope in backfill_envelopes(chunk, partitions):
            producer.produce(topic, value=envelope, partition=partition, on_delivery=delivered)
            producer.poll(0)
        left = producer.flush(timeout_s)
        if left or failed:
            return len(pairs) - sent
        sent += len(chunk)
        progress(f"sent {sent}/{len(pairs)} backfill messages to {topic}")
    return 0


def _waiting_for_a_rate(settings: Settings, database: str, limit: int | None) -> list[tuple[str, str | None]]:
    """(conversion_id, advertiser_id) of the conversions whose latest row is fx_missing, from ClickHouse."""
    from postback.clickhouse import client_factory

    sql = ("SELECT conversion_id, advertiser_id FROM conversions FINAL WHERE fx_status = 'fx_missing' "
           "ORDER BY conversion_id")
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    client = client_factory(clickhouse_url(settings), database)()
    return [(str(cid), str(advertiser)) for cid, advertiser in client.query(sql).result_rows]


def _backfill(args: argparse.Namespace, settings: Settings) -> int:
    from postback.topics import Topics

    if args.limit is not None and args.limit < 1:
        print("postback fx backfill: --limit must be at least 1", file=sys.stderr)
        return 2
    pairs = _waiting_for_a_rate(settings, args.database, args.limit)
    limited = " (--limit reached)" if args.limit is not None and len(pairs) == args.limit else ""
    if args.dry_run or not pairs:
        print(f"{len(pairs)} conversions waiting for a rate{limited}" + (": nothing sent (--dry-run)"
                                                                       if args.dry_run and pairs else ""))
        return 0
    topic = Topics(settings.topic_prefix).processor_commission.name
    try:
        unsent = publish_backfill(kafka_bootstrap(settings), topic, pairs, args.timeout)
    except RuntimeError as exc:
        print(f"postback fx backfill: {exc}", file=sys.stderr)
        return 1
    if unsent:
        print(f"postback fx backfill: {unsent} of {len(pairs)} backfill messages were not all acknowledged by "
              "Kafka; run the command again (a backfill is idempotent)", file=sys.stderr)
        return 1
    print(f"{len(pairs)} conversions waiting for a rate{limited}: sent to the processors; they are re-emitted as "
          f"the rate is found")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fx", help="FX rates for the reporting currency (load a CSV file, backfill fx_missing)",
                       description="Manage the FX rates that convert revenue and payouts to the account's "
                                   "reporting currency.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    load = actions.add_parser(
        "load", help="publish the rates of a CSV file to the fx-rates topic",
        description="Publish every rate of FILE to the compacted fx-rates topic, from which the processors and "
                    "the ClickHouse table fx_rates read. Nothing is published when any line is bad.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    load.add_argument("file", metavar="FILE", help="CSV file: date,currency,rate")
    load.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka (default 30)")
    load.set_defaults(handler=_load)
    backfill = actions.add_parser(
        "backfill", help="recompute the conversions that waited for a rate (fx_missing), as new versions",
        description="Find the conversions stored with fx_status = fx_missing in ClickHouse and send them to the "
                    "processors, which recompute the ones whose rates are now loaded and emit them again (same "
                    "version, replacing the fx_missing row).",
        epilog=_BACKFILL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    backfill.add_argument("--dry-run", action="store_true", help="only count the conversions waiting for a rate")
    backfill.add_argument("--limit", type=int, help="at most this many conversions (by conversion_id)")
    backfill.add_argument("--database", default="postback", help="ClickHouse database (default postback)")
    backfill.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka (default 30)")
    backfill.set_defaults(handler=_backfill)
