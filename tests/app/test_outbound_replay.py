"""`postback outbound replay` against the real ClickHouse and Kafka: rendering, skipping what was delivered, resuming."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from app.commands.outbound_replay import (
    ReplayOptions,
    parse_time,
    register_replay,
    replay,
    state_path,
)
from deploy.providers import ClickHouseService, KafkaService, unique_name
from postback.kafka import producer_config
from postback.partners import PartnerConfig, parse_partner_config
from postback.topics import Topics, ensure_topics
from sinks.migrations import apply_migrations

pytestmark = pytest.mark.integration

SECRET = "replay-secret-0123456789"
PARTNERS = f"""
[advertisers.acme]
secrets = {{ k1 = "{"s" * 16}" }}
[offers.o1]
advertiser_id = "acme"
[offers.o2]
advertiser_id = "acme"
[affiliates.aff-1]
[affiliates.aff-1.postbacks.main]
url = "https://aff.example/pb?cid={{click_id}}&p={{payout}}&s={{status}}&k={{idempotency_key}}"
statuses = ["approved"]
secret = "{SECRET}"
[affiliates.aff-1.postbacks.backup]
url = "https://backup.example/pb?cid={{click_id}}&token=t0ps3cret&k={{idempotency_key}}"
method = "POST"
offers = ["o2"]
[affiliates.aff-2]
[affiliates.aff-2.postbacks.main]
url = "https://two.example/pb?cid={{click_id}}"
"""

CONV_COLS = ["conversion_id", "version", "receipt_id", "advertiser_id", "offer_id", "affiliate_id", "click_id", "event",
             "status", "order_id", "sign", "event_time", "received_at", "processed_at", "attributed", "attribution",
             "dedupe_key", "auth_mode", "payout", "payout_currency"]
DELIVERY_COLS = ["conversion_id", "version", "affiliate_id", "endpoint", "url", "method", "attempt", "status",
                 "latency_ms", "error_class", "response_head", "outcome", "attempted_at", "idempotency_key"]


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def conv(cid: str, version: int, *, offer: str = "o1", affiliate: str = "aff-1", status: str = "approved",
         attributed: bool = True, event_time: str | None = "2026-03-01 10:00:00",
         received: str = "2026-03-01 10:00:05", payout: str = "5") -> list[Any]:
    return [cid, version, f"r-{cid}-{version}", "acme", offer, affiliate, f"click-{cid}", "purchase", status,
            f"order-{cid}", 1, ts(event_time) if event_time else None, ts(received), ts(received),
            attributed, "attributed" if attributed else "no_click", f"acme|purchase|{cid}", "hmac", Decimal(payout),
            "USD"]


def attempt(cid: str, version: int, endpoint: str, outcome: str) -> list[Any]:
    return [cid, version, endpoint.split("/")[0], endpoint, "https://aff.example/pb?sig=REDACTED", "GET", 1,
            200 if outcome == "delivered" else 503, 10, None if outcome == "delivered" else "http_5xx", None,
            outcome, ts("2026-03-01 11:00:00"), f"{cid}:{version}"]


@pytest.fixture
def partners() -> PartnerConfig:
    return parse_partner_config(PARTNERS, "partners.toml")


@pytest.fixture
def warehouse(clickhouse: ClickHouseService, ch_database: str) -> Any:
    client = clickhouse.client(ch_database)
    apply_migrations(client, ch_database, progress=lambda _: None)
    client.insert("conversions", [
        conv("A", 1, status="pending"),  # replaced by version 2
        conv("B", 1, status="rejected"),  # main takes approved only; backup takes o2 only
        conv("C", 1, offer="o2", payout="7.25"),  # main and backup
        conv("D", 1, affiliate="aff-2"),  # another affiliate
        conv("E", 1, attributed=False),  # not attributed
        conv("F", 1, event_time="2026-02-27 10:00:00", received="2026-03-01 09:00:00"),  # event before the range
        conv("G", 1, event_time=None, received="2026-03-01 12:00:00"),  # no event time: by receipt time
        conv("H", 1, event_time="2026-03-01 13:00:00", received="2026-03-03 00:00:00"),  # received after the range
    ], column_names=CONV_COLS)
    client.insert("conversions", [conv("A", 2, payout="6")], column_names=CONV_COLS)
    client.insert("outbound_deliveries", [
        attempt("C", 1, "aff-1/main", "delivered"),  # already delivered: skipped
        attempt("A", 2, "aff-1/main", "retry"),  # failed only: sent again
        attempt("A", 1, "aff-1/main", "delivered"),  # an older version delivered: v2 is still sent
        attempt("C", 1, "aff-1/backup", "retry"),
    ], column_names=DELIVERY_COLS)
    return client


RANGE = {"from_ms": parse_time("2026-03-01"), "to_ms": parse_time("2026-03-02T00:00:00Z")}


def test_dry_run_renders_redacted_urls_and_skips_what_was_delivered(warehouse: Any, partners: PartnerConfig,
                                                                    tmp_path: Path) -> None:
    lines: list[str] = []
    result = replay(warehouse, partners, ReplayOptions("aff-1", **RANGE), dry_run=True, state_dir=tmp_path,
                    out=lines.append, now_ms=lambda: 1_772_000_000_000)
    # A (v2), B, C, G, H are aff-1's attributed conversions in range by event time (G by its receipt time);
    # B (rejected, offer o1) matches neither endpoint.
    assert (result.conversions, result.requests, result.skipped_delivered, result.queued, result.unrenderable) \
        == (5, 5, 1, 4, 0)
    assert result.shown == [
        "aff-1/main GET https://aff.example/pb?cid=click-A&p=6.000000&s=approved&k=A%3A2&ts=1772000000&sig=REDACTED",
        "aff-1/backup POST https://backup.example/pb?cid=click-C&token=REDACTED&k=C%3A1",
        "aff-1/main GET https://aff.example/pb?cid=click-G&p=5.000000&s=approved&k=G%3A1&ts=1772000000&sig=REDACTED",
        "aff-1/main GET https://aff.example/pb?cid=click-H&p=5.000000&s=approved&k=H%3A1&ts=1772000000&sig=REDACTED",
    ]
    assert all(SECRET not in line and "t0ps3cret" not in line for line in result.shown + lines)
    assert not (tmp_path / "outbound-replay").exists()  # a dry run leaves no state


def test_filters_by_offer_endpoint_and_received_time(warehouse: Any, partners: PartnerConfig) -> None:
    def shown(**options: Any) -> list[str]:
        return [line.split("?")[0] + " " + line.split("k=")[1].split("&")[0]
                for line in replay(warehouse, partners, ReplayOptions("aff-1", **options), dry_run=True,
                                   out=lambda _: None).shown]

    assert shown(offer="o2") == ["aff-1/backup POST https://backup.example/pb C%3A1"]
    assert shown(endpoint="main", **RANGE) == ["aff-1/main GET https://aff.example/pb A%3A2",
                                               "aff-1/main GET https://aff.example/pb G%3A1",
                                               "aff-1/main GET https://aff.example/pb H%3A1"]
    # By receipt time F (event 27 Feb, received 1 Mar) is in, H (received 3 Mar) is out.
    assert [s.split()[-1] for s in shown(by="received", endpoint="aff-1/main", **RANGE)] == ["A%3A2", "F%3A1", "G%3A1"]
    assert [s.split()[-1] for s in shown(endpoint="main")] == ["A%3A2", "F%3A1", "G%3A1", "H%3A1"]  # no range
    with pytest.raises(ValueError, match="no postback endpoint 'nope'"):
        shown(endpoint="nope")
    with pytest.raises(ValueError, match="not in the partner config"):
        replay(warehouse, partners, ReplayOptions("aff-9"), dry_run=True, out=lambda _: None)


def _jobs(kafka: KafkaService, topic: str) -> list[tuple[str, dict[str, Any]]]:
    return [(m.key().decode(), json.loads(m.value())) for m in kafka.read(topic)]


def test_replay_queues_jobs_skips_delivered_and_resumes(warehouse: Any, partners: PartnerConfig, kafka: KafkaService,
                                                        tmp_path: Path) -> None:
    from confluent_kafka import Producer

    topics = Topics(unique_name("rp"))
    ensure_topics(kafka.admin(), [topics.outbound_retry])
    producer = Producer(producer_config(kafka.bootstrap_servers, 30.0))
    opts = ReplayOptions("aff-1", **RANGE)
    now = 1_772_000_000_000

    class Interrupted(Exception):
        pass

    def interrupt_after_first_batch(line: str) -> None:
        if "conversions read" in line:
            raise Interrupted(line)

    # One conversion per batch; the run dies after its first batch was acknowledged and saved.
    with pytest.raises(Interrupted):
        replay(warehouse, partners, opts, producer=producer, topic=topics.outbound_retry.name, state_dir=tmp_path,
               batch_size=1, out=interrupt_after_first_batch, now_ms=lambda: now)
    state = json.loads(state_path(tmp_path, opts).read_text())
    assert (state["last_conversion_id"], state["queued"], state["done"]) == ("A", 1, False)
    assert [(k, j["conversion"]["conversion_id"]) for k, j in _jobs(kafka, topics.outbound_retry.name)] \
        == [("aff-1/main", "A")]

    lines: list[str] = []
    result = replay(warehouse, partners, opts, producer=producer, topic=topics.outbound_retry.name,
                    state_dir=tmp_path, resume=True, batch_size=1, out=lines.append, now_ms=lambda: now)
    assert lines[0] == "resuming after conversion A (1 jobs queued before)"
    assert (result.queued, result.skipped_delivered) == (4, 1)
    jobs = _jobs(kafka, topics.outbound_retry.name)
    assert sorted((key, job["conversion"]["conversion_id"], job["conversion"]["version"]) for key, job in jobs) == [
        ("aff-1/backup", "C", 1), ("aff-1/main", "A", 2), ("aff-1/main", "G", 1),
        ("aff-1/main", "H", 1)]  # C was delivered to main
    by_id = {(key, job["conversion"]["conversion_id"]): job for key, job in jobs}
    a = by_id[("aff-1/main", "A")]
    assert {k: a[k] for k in ("endpoint", "attempt", "not_before_ms", "first_attempt_ms", "last_error")} \
        == {"endpoint": "aff-1/main", "attempt": 1, "not_before_ms": now, "first_attempt_ms": now, "last_error": ""}
    assert {k: a["conversion"][k] for k in ("click_id", "status", "payout", "payout_currency", "event_time_ms",
                                            "affiliate_id", "offer_id")} \
        == {"click_id": "click-A", "status": "approved", "payout": "6.000000", "payout_currency": "USD",
            "event_time_ms": 1_772_359_200_000, "affiliate_id": "aff-1", "offer_id": "o1"}
    assert by_id[("aff-1/main", "G")]["conversion"]["event_time_ms"] is None
    state = json.loads(state_path(tmp_path, opts).read_text())
    assert (state["last_conversion_id"], state["queued"], state["done"]) == ("H", 4, True)

    # Resuming a finished replay sends nothing more.
    again: list[str] = []
    replay(warehouse, partners, opts, producer=producer, topic=topics.outbound_retry.name, state_dir=tmp_path,
           resume=True, out=again.append)
    assert "already finished" in again[0]
    assert len(_jobs(kafka, topics.outbound_retry.name)) == 4


def test_the_replay_action_parses_its_options() -> None:
    parser = argparse.ArgumentParser()
    register_replay(parser.add_subparsers(dest="action"))
    args = parser.parse_args(["replay", "--affiliate", "aff-1", "--offer", "o1", "--from", "2026-03-01",
                              "--to", "2026-03-02T06:00:00+02:00", "--endpoint", "main", "--dry-run", "--resume"])
    assert (args.affiliate, args.offer, args.endpoint, args.dry_run, args.resume, args.by) \
        == ("aff-1", "o1", "main", True, True, "event")
    assert args.from_ms == 1_772_323_200_000 and args.to_ms == 1_772_424_000_000
    assert args.handler.__name__ == "_replay"
    with pytest.raises(SystemExit):
        parser.parse_args(["replay", "--affiliate", "a", "--from", "yesterday"])
