"""Schema migrations against the real ClickHouse: bookkeeping, idempotency, the analysts' views."""

from __future__ import annotations

import dataclasses
import re
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from deploy.providers import ClickHouseService, unique_name
from sinks.migrations import MIGRATIONS, Migration, MigrationError, apply_migrations, current_version

pytestmark = pytest.mark.integration

TABLES = {"clicks", "conversions", "postback_outcomes", "rejections", "duplicates", "fx_rates", "outbound_deliveries"}
VIEWS = {"v_conversions_net", "v_revenue_daily", "v_revenue_by_click_day", "v_postback_health_hourly",
         "v_rejection_reasons_daily", "v_match_rate_daily", "v_affiliate_conversion_rate_daily",
         "v_payouts", "v_payouts_daily", "v_payout_to_margin", "v_cap_usage", "v_payout_holds",
         "v_outbound_success_daily", "v_outbound_failing_now"}


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


def quiet(_: str) -> None:
    pass


def rows(client: Any, sql: str) -> list[dict[str, Any]]:
    result = client.query(sql)
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


def scalar(client: Any, sql: str) -> Any:
    return client.query(sql).result_rows[0][0]


@pytest.fixture
def migrated(clickhouse: ClickHouseService, ch_database: str) -> Any:
    client = clickhouse.client(ch_database)
    apply_migrations(client, ch_database, progress=quiet)
    return client


# -- bookkeeping ------------------------------------------------------------------------------


def test_migrate_from_empty_applies_all_and_records_them(clickhouse: ClickHouseService) -> None:
    database = unique_name("mig")  # does not exist yet: apply_migrations creates it
    client = clickhouse.client()
    messages: list[str] = []
    try:
        assert current_version(client, database) == 0
        applied = apply_migrations(client, database, progress=messages.append)
        assert applied == [m.version for m in MIGRATIONS]
        assert len(messages) == len(MIGRATIONS)
        recorded = client.query(f"SELECT version, name, checksum FROM {database}.schema_migrations "
                                "ORDER BY version").result_rows
        assert recorded == [(m.version, m.name, m.checksum) for m in MIGRATIONS]
        assert current_version(client, database) == MIGRATIONS[-1].version
        names = {r[0] for r in client.query(f"SELECT name FROM system.tables WHERE database = '{database}'").result_rows}
        assert TABLES | VIEWS | {"schema_migrations"} == names
        engines = dict(client.query(f"SELECT name, engine FROM system.tables WHERE database = '{database}'").result_rows)
        assert all(engines[t] == "ReplacingMergeTree" for t in TABLES)
        assert all(engines[v] == "View" for v in VIEWS)
        applied_at = scalar(client, f"SELECT max(applied_at) FROM {database}.schema_migrations")
        assert abs((datetime.now(timezone.utc) - applied_at.replace(tzinfo=timezone.utc)).total_seconds()) < 300
    finally:
        clickhouse.drop_database(database)


def test_running_again_applies_nothing(clickhouse: ClickHouseService, ch_database: str) -> None:
    client = clickhouse.client(ch_database)
    assert apply_migrations(client, ch_database, progress=quiet) == [m.version for m in MIGRATIONS]
    messages: list[str] = []
    assert apply_migrations(client, ch_database, progress=messages.append) == []
    assert "up to date" in messages[-1]
    assert scalar(client, "SELECT count() FROM schema_migrations") == len(MIGRATIONS)


def test_half_applied_migration_is_rerun(clickhouse: ClickHouseService, ch_database: str) -> None:
    client = clickhouse.client(ch_database)
    first = MIGRATIONS[0]
    client.command(first.statements[0].replace("{db}", ch_database))  # crashed after one statement
    assert current_version(client, ch_database) == 0
    assert apply_migrations(client, ch_database, progress=quiet) == [m.version for m in MIGRATIONS]


def test_new_migration_is_applied_on_top(clickhouse: ClickHouseService, ch_database: str) -> None:
    client = clickhouse.client(ch_database)
    apply_migrations(client, ch_database, progress=quiet)
    extra = Migration(MIGRATIONS[-1].version + 1, "add_note",
                      ("ALTER TABLE {db}.clicks ADD COLUMN IF NOT EXISTS note String DEFAULT ''",))
    assert apply_migrations(client, ch_database, progress=quiet, migrations=MIGRATIONS + (extra,)) == [extra.version]
    assert current_version(client, ch_database) == extra.version
    # ... and code that does not know it refuses the newer database.
    with pytest.raises(MigrationError, match="does not know"):
        apply_migrations(client, ch_database, progress=quiet)


def test_edited_applied_migration_is_refused(clickhouse: ClickHouseService, ch_database: str) -> None:
    client = clickhouse.client(ch_database)
    apply_migrations(client, ch_database, progress=quiet)
    first = MIGRATIONS[0]
    edited = dataclasses.replace(first, statements=first.statements[:-1]
                                 + (first.statements[-1].replace("reason LowCardinality(String)", "reason String"),))
    assert edited.checksum != first.checksum
    newer = Migration(MIGRATIONS[-1].version + 1, "would_be_next", ("CREATE TABLE IF NOT EXISTS {db}.should_not_exist "
                                                                    "(x UInt8) ENGINE = MergeTree ORDER BY x",))
    with pytest.raises(MigrationError, match="edited"):
        apply_migrations(client, ch_database, progress=quiet, migrations=(edited,) + MIGRATIONS[1:] + (newer,))
    assert scalar(client, "EXISTS TABLE should_not_exist") == 0  # refused before applying anything


def test_tampered_recorded_checksum_is_refused(clickhouse: ClickHouseService, ch_database: str) -> None:
    client = clickhouse.client(ch_database)
    apply_migrations(client, ch_database, progress=quiet)
    client.command("ALTER TABLE schema_migrations UPDATE checksum = 'deadbeef' WHERE version = 1",
                   settings={"mutations_sync": 2})
    with pytest.raises(MigrationError, match="migration 1"):
        apply_migrations(client, ch_database, progress=quiet)


def test_whitespace_does_not_change_the_checksum() -> None:
    m = MIGRATIONS[0]
    reindented = dataclasses.replace(m, statements=tuple("\n  " + "   ".join(s.split()) + "\n" for s in m.statements))
    assert reindented.checksum == m.checksum
    assert len({m.version for m in MIGRATIONS}) == len(MIGRATIONS)


# -- sample data and the views ------------------------------------------------------------------

CLICK_COLS = ["click_id", "clicked_at", "offer_id", "affiliate_id", "campaign_id", "sub1", "sub2", "sub3", "sub4",
              "sub5", "ip", "user_agent", "referer", "source", "extras"]


def click(click_id: str, at: str, affiliate: str, offer: str = "o1") -> list[Any]:
    return [click_id, ts(at), offer, affiliate, "camp", "s1", None, None, None, None, "198.51.100.7", "UA/1", None,
            "redirect", {"utm_source": "x"}]


CONV_COLS = ["conversion_id", "version", "receipt_id", "advertiser_id", "offer_id", "affiliate_id", "campaign_id",
             "click_id", "sub1", "sub2", "sub3", "sub4", "sub5", "event", "status", "order_id", "customer_id", "period",
             "amount", "currency", "sign", "event_time", "received_at", "processed_at", "clicked_at", "attributed",
             "attribution", "click_to_conversion_s", "dedupe_key", "auth_mode", "extras"]


def conversion(cid: str, version: int, *, status: str = "approved", event: str = "purchase", order: str | None = None,
               amount: str | None = None, click_id: str | None = None, clicked_at: str | None = None,
               affiliate: str | None = None, attribution: str = "attributed", event_time: str | None = None,
               received: str = "2026-03-01 09:00:00", offer: str | None = "o1") -> list[Any]:
    sign = -1 if event in ("refund", "chargeback") else 1
    received_at = ts(received)
    reported = ts(event_time) if event_time else received_at
    return [cid, version, f"r-{cid}-{version}", "adv1", offer, affiliate, None, click_id, None, None, None, None,
            None, event, status, order, None, None, Decimal(amount) if amount else None,
            "USD" if amount else None, sign, ts(event_time) if event_time else None, received_at,
            ts(received.replace(":00:00", ":00:01")), ts(clicked_at) if clicked_at else None,
            attribution == "attributed", attribution,
            int((reported - ts(clicked_at)).total_seconds()) if clicked_at else None,
            f"adv1|{event}|{order}", "hmac", {}]


OUTCOME_COLS = ["receipt_id", "outcome", "reason", "advertiser_id", "event", "conversion_id", "received_at",
                "processed_at"]


def outcome(receipt: str, kind: str, latency_ms: int, reason: str = "", advertiser: str = "adv1",
            at: str = "2026-03-01 09:10:00") -> list[Any]:
    received = ts(at)
    processed = datetime.fromtimestamp(received.timestamp() + latency_ms / 1000, timezone.utc)
    return [receipt, kind, reason, advertiser, "purchase", f"c-{receipt}" if kind == "accepted" else "", received,
            processed]


REJECTION_COLS = ["receipt_id", "received_at", "processed_at", "advertiser_id", "event", "reason", "detail",
                  "remote_ip", "params", "body"]
DUPLICATE_COLS = ["receipt_id", "first_receipt_id", "received_at", "processed_at", "advertiser_id", "event", "order_id",
                  "dedupe_key", "reason"]


@pytest.fixture
def sample(migrated: Any) -> Any:
    client = migrated
    # Five clicks; c4 arrives twice (a redelivery in another batch) and collapses under FINAL.
    client.insert("clicks", [click("c1", "2026-02-28 10:00:00", "a1"), click("c2", "2026-02-28 11:00:00", "a1"),
                             click("c3", "2026-02-28 12:00:00", "a1"), click("c4", "2026-02-28 13:00:00", "a2")],
                  column_names=CLICK_COLS)
    client.insert("clicks", [click("c4", "2026-02-28 13:00:00", "a2"), click("c5", "2026-02-28 14:00:00", "a2")],
                  column_names=CLICK_COLS)
    a1 = {"affiliate": "a1", "clicked_at": "2026-02-28 10:00:00"}
    client.insert("conversions", [
        # Order A: pending first, approved by a later postback (version 2 replaces version 1).
        conversion("X", 1, status="pending", order="A", amount="100", click_id="c1", event_time="2026-03-01 08:55:00",
                   **a1),
        # Order B: approved, then reversed to rejected: it leaves the approved set.
        conversion("Y", 1, order="B", amount="50", click_id="c2", **{**a1, "clicked_at": "2026-02-28 11:00:00"}),
        # Order C: approved, no event_time (reported by receipt time).
        conversion("Z", 1, order="C", amount="20", click_id="c3", received="2026-03-01 15:00:00",
                   **{**a1, "clicked_at": "2026-02-28 12:00:00"}),
        # Order D: no click id at all.
        conversion("W", 1, order="D", amount="40", attribution="no_click_id"),
        # A lead on c4 (affiliate a2): no money.
        conversion("L", 1, event="lead", click_id="c4", affiliate="a2", clicked_at="2026-02-28 13:00:00"),
        # Order E: named a click that never arrived, still pending.
        conversion("E", 1, status="pending", order="E", amount="10", click_id="missing", attribution="no_click"),
    ], column_names=CONV_COLS)
    client.insert("conversions", [
        conversion("X", 2, order="A", amount="100", click_id="c1", event_time="2026-03-01 08:55:00",
                   received="2026-03-01 10:00:00", **a1),
        # Refund of order A: its own conversion, sign -1.
        conversion("R", 1, event="refund", order="A", amount="30", click_id="c1", event_time="2026-03-01 12:00:00",
                   received="2026-03-01 12:00:00", **a1),
        conversion("Y", 2, status="rejected", order="B", amount="50", click_id="c2", received="2026-03-01 11:00:00",
                   **{**a1, "clicked_at": "2026-02-28 11:00:00"}),
    ], column_names=CONV_COLS)
    latencies = [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    kinds = ["accepted"] * 6 + ["duplicate"] * 2 + ["rejected"] * 2
    reasons = [""] * 6 + ["retry", "order_repeat", "bad_signature", "stale_timestamp"]
    client.insert("postback_outcomes", [outcome(f"p{i}", k, ms, r) for i, (k, ms, r)
                                        in enumerate(zip(kinds, latencies, reasons))], column_names=OUTCOME_COLS)
    # p0 processed again after a restart (later processed_at, same receipt): FINAL keeps one.
    client.insert("postback_outcomes", [outcome("p0", "accepted", 100),
                                        outcome("u1", "rejected", 50, "unknown_advertiser", advertiser="")],
                  column_names=OUTCOME_COLS)
    client.insert("rejections", [
        ["p8", ts("2026-03-01 09:10:00"), ts("2026-03-01 09:10:01"), "adv1", "purchase", "bad_signature",
         "signature does not match", "203.0.113.1", {"order_id": "F", "sig": "00"}, b""],
        ["p9", ts("2026-03-01 09:10:00"), ts("2026-03-01 09:10:01"), "adv1", "purchase", "stale_timestamp",
         "ts is 900 s old", "203.0.113.2", {"order_id": "G"}, b""],
        ["u1", ts("2026-03-01 09:10:00"), ts("2026-03-01 09:10:00"), "", "", "unknown_advertiser", "advertiser_id: zz",
         "203.0.113.3", {}, b'{"a": 1}'],
    ], column_names=REJECTION_COLS)
    client.insert("duplicates", [
        ["p6", "r-X-1", ts("2026-03-01 09:10:00"), ts("2026-03-01 09:10:01"), "adv1", "purchase", "A", "adv1|purchase|A",
         "retry"],
        ["p7", "r-X-1", ts("2026-03-01 09:10:00"), ts("2026-03-01 09:10:01"), "adv1", "purchase", "A", "adv1|purchase|A",
         "order_repeat"],
    ], column_names=DUPLICATE_COLS)
    return client


def test_conversions_final_keeps_the_highest_version(sample: Any) -> None:
    assert scalar(sample, "SELECT count() FROM conversions") == 9
    latest = dict(sample.query("SELECT conversion_id, status FROM conversions FINAL").result_rows)
    assert latest == {"X": "approved", "Y": "rejected", "Z": "approved", "W": "approved", "L": "approved",
                      "E": "pending", "R": "approved"}
    signed = dict(sample.query("SELECT conversion_id, signed_amount FROM conversions FINAL "
                               "WHERE amount IS NOT NULL").result_rows)
    assert signed["R"] == Decimal("-30") and signed["X"] == Decimal("100")
    assert scalar(sample, "SELECT count() FROM clicks FINAL") == 5


def test_net_revenue(sample: Any) -> None:
    net = rows(sample, "SELECT currency, sum(signed_amount) AS net, count() AS n FROM v_conversions_net "
                       "GROUP BY currency ORDER BY currency")
    # 100 (A) - 30 (refund of A) + 20 (C) + 40 (D); B was rejected, E is pending; the lead has no money.
    assert net == [{"currency": "USD", "net": Decimal("130"), "n": 4}, {"currency": None, "net": None, "n": 1}]
    assert {r["conversion_id"] for r in rows(sample, "SELECT conversion_id FROM v_conversions_net")} \
        == {"X", "R", "Z", "W", "L"}
    reported = dict(sample.query("SELECT conversion_id, reported_at FROM v_conversions_net").result_rows)
    assert reported["X"].replace(tzinfo=None) == datetime(2026, 3, 1, 8, 55)  # event time
    assert reported["Z"].replace(tzinfo=None) == datetime(2026, 3, 1, 15, 0)  # receipt time


def test_filters_on_a_view_apply_after_final(sample: Any) -> None:
    # Y's version 1 was approved; were the filter pushed below FINAL, it would come back.
    assert {r[0] for r in sample.query("SELECT conversion_id FROM v_conversions_net WHERE version = 1").result_rows} \
        == {"Z", "W", "L", "R"}
    assert {r[0] for r in sample.query("SELECT conversion_id FROM v_conversions_net "
                                       "WHERE received_at < '2026-03-01 10:00:00'").result_rows} == {"W", "L"}


def test_revenue_daily_and_reversal_rate(sample: Any) -> None:
    daily = rows(sample, "SELECT * FROM v_revenue_daily ORDER BY affiliate_id, currency")
    by_key = {(r["affiliate_id"], r["currency"]): r for r in daily}
    a1 = by_key[("a1", "USD")]
    assert str(a1["day"]) == "2026-03-01" and a1["advertiser_id"] == "adv1" and a1["offer_id"] == "o1"
    assert (a1["gross"], a1["reversals"], a1["net"]) == (Decimal("120"), Decimal("30"), Decimal("90"))
    assert (a1["conversions"], a1["reversals_count"], a1["conversions_total"]) == (2, 1, 3)
    assert a1["reversal_rate"] == pytest.approx(0.25)
    assert (by_key[(None, "USD")]["net"], by_key[(None, "USD")]["reversal_rate"]) == (Decimal("40"), 0.0)
    lead = by_key[("a2", None)]
    assert (lead["conversions"], lead["gross"], lead["net"], lead["reversal_rate"]) == (1, 0, 0, None)
    assert sum(r["net"] for r in daily) == Decimal("130")


def test_revenue_by_click_day(sample: Any) -> None:
    by_click = rows(sample, "SELECT * FROM v_revenue_by_click_day ORDER BY click_day, affiliate_id")
    clicked = [r for r in by_click if r["click_day"] is not None]
    assert {(str(r["click_day"]), r["affiliate_id"], r["attributed"], r["net"]) for r in clicked} \
        == {("2026-02-28", "a1", True, Decimal("90")), ("2026-02-28", "a2", True, Decimal("0"))}
    unclicked = [r for r in by_click if r["click_day"] is None]
    assert [(r["attributed"], r["net"]) for r in unclicked] == [(False, Decimal("40"))]
    assert sum(r["net"] for r in by_click) == Decimal("130")  # reconciles with v_revenue_daily


def test_postback_health_hourly(sample: Any) -> None:
    health = {r["advertiser_id"]: r for r in rows(sample, "SELECT * FROM v_postback_health_hourly")}
    adv1 = health["adv1"]
    assert adv1["hour"].replace(tzinfo=None) == datetime(2026, 3, 1, 9)
    assert (adv1["received"], adv1["accepted"], adv1["duplicates"], adv1["rejected"]) == (10, 6, 2, 2)
    assert adv1["success_rate"] == pytest.approx(0.6)
    assert adv1["dedupe_rate"] == pytest.approx(0.2)
    assert adv1["rejection_rate"] == pytest.approx(0.2)
    assert adv1["p50_latency_ms"] == pytest.approx(550)  # linear interpolation between 500 and 600
    assert adv1["p99_latency_ms"] == pytest.approx(991)  # 100 + 0.99 * 9 * 100
    assert adv1["max_latency_ms"] == 1000
    unknown = health[""]
    assert (unknown["received"], unknown["rejected"], unknown["success_rate"]) == (1, 1, 0.0)


def test_rejection_reasons_daily(sample: Any) -> None:
    reasons = {(r["advertiser_id"], r["reason"]): r for r in rows(sample, "SELECT * FROM v_rejection_reasons_daily")}
    assert set(reasons) == {("adv1", "bad_signature"), ("adv1", "stale_timestamp"), ("", "unknown_advertiser")}
    bad = reasons[("adv1", "bad_signature")]
    assert (str(bad["day"]), bad["rejections"], bad["remote_ips"], bad["last_receipt_id"]) == ("2026-03-01", 1, 1, "p8")
    assert bad["share_of_day"] == pytest.approx(0.5)
    assert reasons[("", "unknown_advertiser")]["share_of_day"] == pytest.approx(1.0)


def test_match_rate_daily(sample: Any) -> None:
    (match,) = rows(sample, "SELECT * FROM v_match_rate_daily")
    assert (str(match["day"]), match["advertiser_id"], match["offer_id"]) == ("2026-03-01", "adv1", "o1")
    # X, R, Y, Z, L attributed; E named a missing click; W had no click id.
    assert (match["accepted"], match["attributed"], match["no_click"], match["no_click_id"]) == (7, 5, 1, 1)
    assert match["match_rate"] == pytest.approx(5 / 7)
    assert match["click_id_match_rate"] == pytest.approx(5 / 6)


def test_affiliate_conversion_rate_daily(sample: Any) -> None:
    rates = {r["affiliate_id"]: r for r in rows(sample, "SELECT * FROM v_affiliate_conversion_rate_daily")}
    assert set(rates) == {"a1", "a2"}
    a1, a2 = rates["a1"], rates["a2"]
    # a1: clicks c1, c2, c3; approved attributed conversions X (c1) and Z (c3): Y was rejected, R is a refund.
    assert (str(a1["click_day"]), a1["offer_id"], a1["clicks"], a1["conversions"], a1["converted_clicks"]) \
        == ("2026-02-28", "o1", 3, 2, 2)
    assert a1["conversion_rate"] == pytest.approx(2 / 3)
    # a2: clicks c4 (delivered twice, counted once) and c5; the lead on c4.
    assert (a2["clicks"], a2["conversions"], a2["conversion_rate"]) == (2, 1, pytest.approx(0.5))


DOC = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"


def doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_query_in_the_analytics_doc_runs(sample: Any) -> None:
    queries = doc_queries()
    assert len(queries) >= 8
    for sql in queries:
        sample.query(sql)


def test_canonical_net_revenue_query_from_the_doc(sample: Any) -> None:
    (canonical,) = [q for q in doc_queries() if "AS net" in q and "v_conversions_net" in q and "sumIf" in q]
    result = rows(sample, canonical)
    assert [(str(r["day"]), r["advertiser_id"], r["currency"], r["gross"], r["reversals"], r["net"]) for r in result] \
        == [("2026-03-01", "adv1", "USD", Decimal("160"), Decimal("30"), Decimal("130"))]


# -- commission: payouts, margin, caps, holds ------------------------------------------------------

COMMISSION_COLS = ["payout", "payout_currency", "payout_status", "payout_reason", "payout_rule", "reporting_currency",
                   "revenue_reporting", "payout_reporting", "revenue_fx_rate", "revenue_fx_date", "payout_fx_rate",
                   "payout_fx_date", "fx_status", "cap_decision"]
EUR = Decimal("1.087")


def paid(cid: str, version: int, *, amount: str, currency: str, payout: str, payout_currency: str = "USD",
         status: str = "approved", payout_status: str = "payable", reason: str | None = None,
         revenue_reporting: str | None = None, payout_reporting: str | None = None, fx_status: str = "ok",
         cap: str | None = None, offer: str = "o1", affiliate: str = "a1", event: str = "purchase",
         order: str | None = None) -> list[Any]:
    row = conversion(cid, version, status=status, event=event, order=order or cid, amount=amount, offer=offer,
                     affiliate=affiliate, click_id=f"click-{cid}", clicked_at="2026-03-01 07:00:00",
                     event_time="2026-03-01 08:00:00", received=f"2026-03-01 {8 + version:02d}:00:00")
    row[CONV_COLS.index("currency")] = currency
    rate = {"USD": Decimal(1), "EUR": EUR}
    fx_ok = fx_status == "ok"
    return row + [Decimal(payout), payout_currency, payout_status, reason, f"offer {offer} {event}: cpa", "USD",
                  Decimal(revenue_reporting) if revenue_reporting else None,
                  Decimal(payout_reporting) if payout_reporting else None,
                  rate.get(currency) if fx_ok else None, date(2026, 3, 1) if fx_ok else None,
                  rate.get(payout_currency) if fx_ok else None, date(2026, 2, 27) if fx_ok else None,
                  fx_status, cap]


@pytest.fixture
def payouts(migrated: Any) -> Any:
    client = migrated
    cols = CONV_COLS + COMMISSION_COLS
    client.insert("conversions", [
        # P: pending and payable, then approved with a tier's higher payout (version 2 replaces version 1).
        paid("P", 1, amount="100", currency="EUR", payout="5", status="pending", revenue_reporting="108.70",
             payout_reporting="5"),
        # Q: a payout in EUR, converted.
        paid("Q", 1, amount="50", currency="USD", payout="7.5", payout_currency="EUR", revenue_reporting="50",
             payout_reporting="8.15"),
        # S: still pending, payable.
        paid("S", 1, amount="40", currency="USD", payout="4", status="pending", revenue_reporting="40",
             payout_reporting="4"),
        # H: over the offer's daily cap (hold); J: over the affiliate's (reject). Payout 0 both.
        paid("H", 1, amount="20", currency="USD", payout="0", payout_status="hold", reason="cap_daily_conversions",
             revenue_reporting="20", payout_reporting="0", affiliate="a2", cap="over offer:o1 day 2026-03-01 2/2"),
        paid("J", 1, amount="10", currency="USD", payout="0", payout_status="rejected",
             reason="affiliate_cap_daily_conversions", revenue_reporting="10", payout_reporting="0", affiliate="a2",
             cap="over affiliate:a2@o1 day 2026-03-01 1/1"),
        # F: no GBP rate: the payout stands in its own currency, the reporting amounts are NULL.
        paid("F", 1, amount="10", currency="GBP", payout="3", payout_currency="GBP", fx_status="fx_missing",
             offer="o2"),
    ], column_names=cols)
    client.insert("conversions", [
        paid("P", 2, amount="100", currency="EUR", payout="6", revenue_reporting="108.70", payout_reporting="6"),
        # K: refund of P's order: the 5 paid so far clawed back (a reversal, so revenue is signed by `sign`).
        paid("K", 1, amount="30", currency="EUR", payout="-5", reason="clawback", revenue_reporting="32.61",
             payout_reporting="-5", event="refund", order="P"),
    ], column_names=cols)
    # A conversion written before the commission engine: no payout fields, not in the payout views.
    client.insert("conversions", [conversion("OLD", 1, order="OLD", amount="99", affiliate="a1")],
                  column_names=CONV_COLS)
    client.insert("fx_rates", [[date(2026, 3, 1), "EUR", EUR, "USD", ts("2026-03-01 00:00:00")],
                               [date(2026, 3, 1), "EUR", Decimal("1.088000000001"), "USD", ts("2026-03-01 06:00:00")],
                               [date(2026, 2, 27), "GBP", Decimal("1.25"), "USD", ts("2026-03-01 00:00:00")]],
                  column_names=["date", "currency", "rate", "reporting_currency", "loaded_at"])
    return client


def test_commission_columns_and_types(migrated: Any) -> None:
    types = dict(migrated.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                "AND table = 'conversions'").result_rows)
    assert {name: types[name] for name in COMMISSION_COLS + ["signed_revenue_reporting"]} == {
        "payout": "Nullable(Decimal(18, 6))", "payout_currency": "LowCardinality(Nullable(String))",
        "payout_status": "LowCardinality(Nullable(String))", "payout_reason": "LowCardinality(Nullable(String))",
        "payout_rule": "Nullable(String)", "reporting_currency": "LowCardinality(Nullable(String))",
        "revenue_reporting": "Nullable(Decimal(18, 6))", "payout_reporting": "Nullable(Decimal(18, 6))",
        "revenue_fx_rate": "Nullable(Decimal(28, 12))", "revenue_fx_date": "Nullable(Date)",
        "payout_fx_rate": "Nullable(Decimal(28, 12))", "payout_fx_date": "Nullable(Date)",
        "fx_status": "LowCardinality(Nullable(String))", "cap_decision": "Nullable(String)",
        "signed_revenue_reporting": "Nullable(Decimal(18, 6))",
    }
    fx = dict(migrated.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                             "AND table = 'fx_rates'").result_rows)
    assert fx == {"date": "Date", "currency": "LowCardinality(String)", "rate": "Decimal(28, 12)",
                  "reporting_currency": "LowCardinality(String)", "loaded_at": "DateTime64(3, 'UTC')"}


def test_commission_migration_on_a_table_with_rows_leaves_them_null(clickhouse: ClickHouseService,
                                                                    ch_database: str) -> None:
    client = clickhouse.client(ch_database)
    apply_migrations(client, ch_database, progress=quiet, migrations=MIGRATIONS[:2])
    client.insert("conversions", [conversion("B4", 1, order="B4", amount="12")], column_names=CONV_COLS)
    assert apply_migrations(client, ch_database, progress=quiet) == [3, 4, 5, 6]
    (row,) = rows(client, "SELECT payout, payout_status, revenue_fx_date, signed_revenue_reporting FROM conversions")
    assert row == {"payout": None, "payout_status": None, "revenue_fx_date": None, "signed_revenue_reporting": None}
    assert scalar(client, "SELECT count() FROM v_payouts") == 0


def test_fx_rates_keep_the_latest_load(payouts: Any) -> None:
    assert rows(payouts, "SELECT date, currency, rate FROM fx_rates FINAL ORDER BY currency") == [
        {"date": date(2026, 3, 1), "currency": "EUR", "rate": Decimal("1.088000000001")},
        {"date": date(2026, 2, 27), "currency": "GBP", "rate": Decimal("1.25")},
    ]


def test_v_payouts_is_the_latest_version_of_decided_conversions(payouts: Any) -> None:
    got = {r["conversion_id"]: r for r in rows(payouts, "SELECT * FROM v_payouts")}
    assert set(got) == {"P", "Q", "S", "H", "J", "F", "K"}  # OLD has no payout decision
    assert (got["P"]["version"], got["P"]["status"], got["P"]["payout"]) == (2, "approved", Decimal("6"))
    assert (got["K"]["is_reversal"], got["K"]["payout"], got["K"]["signed_revenue_reporting"]) \
        == (True, Decimal("-5"), Decimal("-32.61"))
    assert (got["Q"]["payout_fx_rate"], got["Q"]["payout_fx_date"]) == (EUR, date(2026, 2, 27))
    assert (got["F"]["fx_status"], got["F"]["payout_reporting"], got["F"]["revenue_fx_rate"]) \
        == ("fx_missing", None, None)
    assert {str(r["day"]) for r in got.values()} == {"2026-03-01"}


def test_payouts_daily_net_of_clawbacks(payouts: Any) -> None:
    daily = {(r["offer_id"], r["affiliate_id"]): r for r in rows(payouts, "SELECT * FROM v_payouts_daily")}
    assert set(daily) == {("o1", "a1"), ("o1", "a2"), ("o2", "a1")}
    a1 = daily[("o1", "a1")]
    assert (str(a1["day"]), a1["reporting_currency"]) == ("2026-03-01", "USD")
    # P 6 (version 2) + Q 8.15 + S 4 (pending, payable); the refund K claws 5 back.
    assert (a1["conversions"], a1["payable"], a1["held"], a1["rejected"], a1["clawbacks"], a1["fx_missing"]) \
        == (3, 3, 0, 0, 1, 0)
    assert (a1["gross_payout"], a1["clawed_back"], a1["net_payout"]) == (Decimal("18.15"), Decimal("-5"),
                                                                         Decimal("13.15"))
    a2 = daily[("o1", "a2")]
    assert (a2["conversions"], a2["payable"], a2["held"], a2["rejected"], a2["net_payout"]) == (2, 0, 1, 1, 0)
    gbp = daily[("o2", "a1")]
    assert (gbp["payable"], gbp["fx_missing"], gbp["net_payout"]) == (1, 1, 0)  # 3 GBP not convertible


def test_payout_to_margin(payouts: Any) -> None:
    margin = {(r["offer_id"], r["affiliate_id"]): r for r in rows(payouts, "SELECT * FROM v_payout_to_margin")}
    a1 = margin[("o1", "a1")]
    # approved: P 108.70 - K 32.61 + Q 50 = 126.09 revenue; payouts 6 - 5 + 8.15 = 9.15. S is pending.
    assert (a1["conversions"], a1["revenue"], a1["payout"], a1["margin"]) \
        == (2, Decimal("126.09"), Decimal("9.15"), Decimal("116.94"))
    assert a1["payout_to_revenue"] == pytest.approx(9.15 / 126.09)
    assert a1["margin_rate"] == pytest.approx(116.94 / 126.09)
    assert (a1["pending_revenue"], a1["pending_payout"], a1["fx_missing"]) == (Decimal("40"), Decimal("4"), 0)
    a2 = margin[("o1", "a2")]
    assert (a2["revenue"], a2["payout"], a2["margin"], a2["payout_to_revenue"]) \
        == (Decimal("30"), Decimal("0"), Decimal("30"), 0.0)
    gbp = margin[("o2", "a1")]
    assert (gbp["revenue"], gbp["payout"], gbp["payout_to_revenue"], gbp["fx_missing"]) == (0, 0, None, 1)
    by_offer = rows(payouts, "SELECT offer_id, sum(revenue) AS revenue, sum(payout) AS payout FROM v_payout_to_margin "
                             "GROUP BY offer_id ORDER BY offer_id")
    assert [(r["offer_id"], r["revenue"], r["payout"]) for r in by_offer] \
        == [("o1", Decimal("156.09"), Decimal("9.15")), ("o2", Decimal("0"), Decimal("0"))]


def test_cap_usage_by_day_and_month(payouts: Any) -> None:
    usage = {(r["period"], r["offer_id"], r["affiliate_id"]): r for r in rows(payouts, "SELECT * FROM v_cap_usage")}
    assert set(usage) == {(p, o, a) for p in ("day", "month") for o, a in (("o1", "a1"), ("o1", "a2"), ("o2", "a1"))}
    for period, start in (("day", "2026-03-01"), ("month", "2026-03-01")):
        a1 = usage[(period, "o1", "a1")]
        assert (str(a1["period_start"]), a1["payable"], a1["payable_payout"], a1["held"], a1["rejected"]) \
            == (start, 3, Decimal("18.15"), 0, 0)
        a2 = usage[(period, "o1", "a2")]
        assert (a2["payable"], a2["payable_payout"], a2["held"], a2["rejected"]) == (0, 0, 1, 1)
        assert a2["held_by_reason"] == {"cap_daily_conversions": 1}
        assert a2["rejected_by_reason"] == {"affiliate_cap_daily_conversions": 1}
    offer_day = rows(payouts, "SELECT sum(payable) AS n FROM v_cap_usage WHERE period = 'day' AND offer_id = 'o1'")
    assert offer_day == [{"n": 3}]


def test_payout_holds(payouts: Any) -> None:
    holds = rows(payouts, "SELECT * FROM v_payout_holds ORDER BY payout_status")
    assert [(str(r["day"]), r["offer_id"], r["affiliate_id"], r["payout_status"], r["payout_reason"], r["conversions"],
             r["revenue"], r["last_conversion_id"], r["sample_cap_decision"]) for r in holds] == [
        ("2026-03-01", "o1", "a2", "hold", "cap_daily_conversions", 1, Decimal("20"), "H",
         "over offer:o1 day 2026-03-01 2/2"),
        ("2026-03-01", "o1", "a2", "rejected", "affiliate_cap_daily_conversions", 1, Decimal("10"), "J",
         "over affiliate:a2@o1 day 2026-03-01 1/1"),
    ]


def test_commission_queries_in_the_analytics_doc(payouts: Any) -> None:
    queries = [q for q in doc_queries() if "v_payout" in q or "v_cap_usage" in q]
    assert len(queries) >= 3
    for sql in queries:
        payouts.query(sql)
    (by_affiliate,) = [q for q in queries if "v_payouts_daily" in q and "net_payout" in q and "affiliate_id" in q]
    result = {r["affiliate_id"]: r for r in rows(payouts, by_affiliate)}
    assert result["a1"]["net_payout_total"] == Decimal("13.15") and result["a2"]["net_payout_total"] == 0


# -- insert deduplication ------------------------------------------------------------------------


def test_insert_deduplication_token_drops_a_retried_insert(migrated: Any) -> None:
    client = migrated
    batch = [conversion("T1", 1, order="T1", amount="5"), conversion("T2", 1, order="T2", amount="7.5")]
    client.insert("conversions", batch, column_names=CONV_COLS, settings={"insert_deduplication_token": "part-0-off-42"})
    assert scalar(client, "SELECT count() FROM conversions") == 2
    # The sink retries the very same batch after a timeout: dropped, although inserted_at differs.
    client.insert("conversions", batch, column_names=CONV_COLS, settings={"insert_deduplication_token": "part-0-off-42"})
    assert scalar(client, "SELECT count() FROM conversions") == 2
    # A different token is a different batch and is written (FINAL still collapses the rows).
    client.insert("conversions", batch, column_names=CONV_COLS, settings={"insert_deduplication_token": "part-0-off-44"})
    assert scalar(client, "SELECT count() FROM conversions") == 4
    assert scalar(client, "SELECT count() FROM conversions FINAL") == 2


# -- outbound postbacks: the delivery log ----------------------------------------------------------

DELIVERY_COLS = ["conversion_id", "version", "affiliate_id", "endpoint", "url", "method", "attempt", "status",
                 "latency_ms", "error_class", "response_head", "outcome", "attempted_at", "idempotency_key"]


def attempt(cid: str, n: int, outcome: str, at: datetime | str, *, endpoint: str = "a1/main", status: int | None = None,
            latency: int | None = None, error: str | None = None, version: int = 1) -> list[Any]:
    affiliate = endpoint.split("/")[0]
    if outcome == "delivered":
        status = 200 if status is None else status
    return [cid, version, affiliate, endpoint, f"https://{affiliate}.example/pb?cid={cid}&sig=REDACTED", "GET", n,
            status, latency, error, None if status is None else "ok", outcome,
            ts(at) if isinstance(at, str) else at, f"{cid}:{version}"]


@pytest.fixture
def deliveries(migrated: Any) -> Any:
    client = migrated
    day = "2026-03-01"
    client.insert("outbound_deliveries", [
        # a1/main on 2026-03-01: four requests (keys), six attempts.
        attempt("k1", 1, "retry", f"{day} 09:00:00", status=503, latency=100, error="http_5xx"),
        attempt("k1", 2, "delivered", f"{day} 09:01:00", latency=200),
        attempt("k2", 1, "delivered", f"{day} 10:00:00", latency=400),
        attempt("k3", 1, "retry", f"{day} 11:00:00", error="timeout"),
        attempt("k3", 2, "dead", f"{day} 12:00:00", error="connect"),
        attempt("k4", 1, "delivered", f"{day} 13:00:00", latency=300),
        attempt("b1", 1, "delivered", f"{day} 13:00:00", endpoint="a1/backup", latency=50),
        attempt("c1", 1, "retry", "2026-03-02 08:00:00", endpoint="a2/main", status=429, latency=10,
                error="http_429"),
    ], column_names=DELIVERY_COLS)
    # k4's record consumed again (another batch): one row under FINAL.
    client.insert("outbound_deliveries", [attempt("k4", 1, "delivered", f"{day} 13:00:00", latency=300)],
                  column_names=DELIVERY_COLS)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    ago = lambda minutes: now - timedelta(minutes=minutes)  # noqa: E731
    client.insert("outbound_deliveries", [
        # f1/down: delivered 50 min ago, then three failures of other conversions.
        attempt("d1", 1, "delivered", ago(50), endpoint="f1/down", latency=30),
        attempt("d2", 1, "retry", ago(40), endpoint="f1/down", status=503, latency=20, error="http_5xx"),
        attempt("d3", 1, "retry", ago(30), endpoint="f1/down", status=503, latency=20, error="http_5xx"),
        attempt("d2", 2, "dead", ago(20), endpoint="f1/down", error="timeout"),
        # f1/recovered: failed two hours ago, delivered ten minutes ago.
        attempt("r1", 1, "retry", ago(120), endpoint="f1/recovered", error="connect"),
        attempt("r1", 2, "delivered", ago(10), endpoint="f1/recovered", latency=15),
        # f1/stale: its last (failed) attempt is three hours old.
        attempt("s1", 1, "retry", ago(180), endpoint="f1/stale", error="connect"),
        # f1/never: never delivered; one failure before the hour counts too.
        attempt("n1", 1, "retry", ago(180), endpoint="f1/never", error="connect"),
        attempt("n1", 2, "retry", ago(30), endpoint="f1/never", status=404, latency=12, error="http_4xx"),
    ], column_names=DELIVERY_COLS)
    client.now = now  # for the assertions
    return client


def test_outbound_deliveries_columns_and_types(migrated: Any) -> None:
    types = dict(migrated.query("SELECT name, type FROM system.columns WHERE database = currentDatabase() "
                                "AND table = 'outbound_deliveries'").result_rows)
    assert types == {
        "conversion_id": "String", "version": "UInt64", "affiliate_id": "LowCardinality(String)",
        "endpoint": "LowCardinality(String)", "url": "String", "method": "LowCardinality(String)",
        "attempt": "UInt32", "status": "Nullable(UInt16)", "latency_ms": "Nullable(UInt32)",
        "error_class": "LowCardinality(Nullable(String))", "response_head": "Nullable(String)",
        "outcome": "LowCardinality(String)", "attempted_at": "DateTime64(3, 'UTC')", "idempotency_key": "String",
        "inserted_at": "DateTime64(3, 'UTC')",
    }
    keys = migrated.query("SELECT sorting_key FROM system.tables WHERE database = currentDatabase() "
                          "AND name = 'outbound_deliveries'").result_rows
    assert keys == [("conversion_id, version, endpoint, attempt",)]


def test_outbound_success_daily(deliveries: Any) -> None:
    daily = {(str(r["day"]), r["endpoint"]): r for r in rows(deliveries, "SELECT * FROM v_outbound_success_daily "
                                                                          "WHERE day < '2026-03-03'")}
    assert set(daily) == {("2026-03-01", "a1/main"), ("2026-03-01", "a1/backup"), ("2026-03-02", "a2/main")}
    main = daily[("2026-03-01", "a1/main")]
    assert main["affiliate_id"] == "a1"
    # k4 was inserted twice and counts once.
    assert (main["attempts"], main["delivered"], main["retries"], main["dead"], main["keys"], main["delivered_keys"]) \
        == (6, 3, 2, 1, 4, 3)
    assert main["success_rate"] == pytest.approx(0.75)
    # Delivered latencies 200, 400, 300: the failed attempts' 100 ms does not count.
    assert main["p50_latency_ms"] == pytest.approx(300)
    assert main["p99_latency_ms"] == pytest.approx(398)  # 300 + 0.98 * 100
    backup = daily[("2026-03-01", "a1/backup")]
    assert (backup["attempts"], backup["success_rate"], backup["p50_latency_ms"], backup["p99_latency_ms"]) \
        == (1, 1.0, 50.0, 50.0)
    failed = daily[("2026-03-02", "a2/main")]
    assert (failed["attempts"], failed["delivered"], failed["retries"], failed["success_rate"],
            failed["p50_latency_ms"], failed["p99_latency_ms"]) == (1, 0, 1, 0.0, None, None)


def test_outbound_failing_now(deliveries: Any) -> None:
    now = deliveries.now.replace(tzinfo=None)
    failing = {r["endpoint"]: r for r in rows(deliveries, "SELECT * FROM v_outbound_failing_now")}
    assert set(failing) == {"f1/down", "f1/never"}
    down = failing["f1/down"]
    assert (down["affiliate_id"], down["consecutive_failures"], down["last_outcome"], down["last_error_class"],
            down["last_status"], down["last_conversion_id"]) == ("f1", 3, "dead", "timeout", None, "d2")
    assert down["last_attempt_at"].replace(tzinfo=None) == now - timedelta(minutes=20)
    assert down["last_delivered_at"].replace(tzinfo=None) == now - timedelta(minutes=50)
    never = failing["f1/never"]
    assert (never["consecutive_failures"], never["last_outcome"], never["last_error_class"], never["last_status"],
            never["last_delivered_at"]) == (2, "retry", "http_4xx", 404, None)
    assert never["last_attempt_at"].replace(tzinfo=None) == now - timedelta(minutes=30)


def test_outbound_queries_in_the_analytics_doc(deliveries: Any) -> None:
    queries = [q for q in doc_queries() if "outbound" in q]
    assert len(queries) >= 3
    for sql in queries:
        deliveries.query(sql)
    (by_affiliate,) = [q for q in queries if "v_outbound_success_daily" in q and "GROUP BY affiliate_id" in q]
    result = {r["affiliate_id"]: r for r in rows(deliveries, by_affiliate.replace("today() - 30", "'2026-03-01'"))}
    assert (result["a1"]["requests"], result["a1"]["delivered_requests"]) == (5, 4)
    (failing,) = [q for q in queries if "v_outbound_failing_now" in q]
    assert {r["endpoint"] for r in rows(deliveries, failing)} == {"f1/down", "f1/never"}
