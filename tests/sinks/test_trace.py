"""`postback trace`: the per-version payout history, against the real ClickHouse."""

from __future__ import annotations

import argparse
from datetime import date
from decimal import Decimal
from typing import Any

import pytest

from deploy.providers import ClickHouseService
from sinks.migrations import apply_migrations
from sinks.queries import describe_payout, trace

from .test_migrations import COMMISSION_COLS, CONV_COLS, conversion, paid, quiet

pytestmark = pytest.mark.integration


@pytest.fixture
def traced(clickhouse: ClickHouseService, ch_database: str) -> Any:
    client = clickhouse.client(ch_database)
    apply_migrations(client, ch_database, progress=quiet)
    cols = CONV_COLS + COMMISSION_COLS
    # Two versions in two inserts (two parts, not merged yet), and the order's refund.
    client.insert("conversions", [paid("P", 1, amount="100", currency="EUR", payout="5", status="pending",
                                       revenue_reporting="108.70", payout_reporting="5",
                                       cap="counted offer:o1 day 2026-03-01 1/100")], column_names=cols)
    client.insert("conversions", [
        paid("P", 2, amount="100", currency="EUR", payout="6", revenue_reporting="108.70", payout_reporting="6",
             cap="counted offer:o1 day 2026-03-01 1/100"),
        paid("K", 1, amount="30", currency="EUR", payout="-5", reason="clawback", revenue_reporting="32.61",
             payout_reporting="-5", event="refund", order="P"),
        paid("F", 1, amount="10", currency="GBP", payout="3", payout_currency="GBP", fx_status="fx_missing",
             order="F"),
    ], column_names=cols)
    client.insert("conversions", [conversion("OLD", 1, order="OLD", amount="9", affiliate="a1")],
                  column_names=CONV_COLS)
    return client


def test_trace_lists_every_version_with_its_payout(traced: Any) -> None:
    journey = trace(traced, "P")
    assert [(c["conversion_id"], c["version"]) for c in journey["conversions"]] == [("K", 1), ("P", 2)]
    payouts = journey["payouts"]
    assert [(p["conversion_id"], p["version"], p["status"], p["payout"]) for p in payouts] \
        == [("K", 1, "approved", Decimal("-5")), ("P", 1, "pending", Decimal("5")), ("P", 2, "approved", Decimal("6"))]
    lines = [describe_payout(p) for p in payouts]
    assert lines == [
        "K v1 refund approved (reversal): payout -5 USD payable (clawback); rule: offer o1 refund: cpa; "
        "fx ok: revenue 32.61 USD at 1.087 of 2026-03-01, payout -5 USD at 1 of 2026-02-27",
        "P v1 purchase pending: payout 5 USD payable; rule: offer o1 purchase: cpa; "
        "fx ok: revenue 108.7 USD at 1.087 of 2026-03-01, payout 5 USD at 1 of 2026-02-27; "
        "cap: counted offer:o1 day 2026-03-01 1/100",
        "P v2 purchase approved: payout 6 USD payable; rule: offer o1 purchase: cpa; "
        "fx ok: revenue 108.7 USD at 1.087 of 2026-03-01, payout 6 USD at 1 of 2026-02-27; "
        "cap: counted offer:o1 day 2026-03-01 1/100",
    ]
    assert payouts[1]["revenue_fx_date"] == date(2026, 3, 1)


def test_trace_of_fx_missing_and_of_a_conversion_before_the_engine(traced: Any) -> None:
    (missing,) = trace(traced, "F")["payouts"]
    assert describe_payout(missing) == ("F v1 purchase approved: payout 3 GBP payable; rule: offer o1 purchase: cpa; "
                                        "fx fx_missing: revenue - USD, payout - USD")
    (old,) = trace(traced, "OLD")["payouts"]
    assert describe_payout(old) == "OLD v1 purchase approved: no payout decision (written before the commission engine)"
    assert trace(traced, "nothing-here")["payouts"] == []


def test_trace_command_prints_the_payouts(traced: Any, clickhouse: ClickHouseService, ch_database: str,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import app.commands.sink as command

    monkeypatch.setattr(command, "clickhouse_url", lambda settings: clickhouse.url)
    assert command._trace(argparse.Namespace(id="P", database=ch_database, json=False), None) == 0
    out = capsys.readouterr().out
    assert "payouts (3)\n  K v1 refund approved (reversal): payout -5 USD payable (clawback)" in out
    assert "P v2 purchase approved: payout 6 USD payable; rule: offer o1 purchase: cpa; fx ok:" in out
    conversions = out.split("conversions (2)\n")[1].split("payouts (3)")[0]
    assert "payout_rule" not in conversions and "conversion_id=P" in conversions
    assert command._trace(argparse.Namespace(id="P", database=ch_database, json=True), None) == 0
    assert '"payout_status": "payable"' in capsys.readouterr().out


# -- outbound postback deliveries ---------------------------------------------------------------


@pytest.fixture
def delivered(traced: Any) -> Any:
    from .test_migrations import DELIVERY_COLS, attempt

    traced.insert("outbound_deliveries", [
        attempt("P", 1, "retry", "2026-03-01 10:00:00.250", endpoint="a1/main", status=503, latency=87,
                error="http_5xx", version=2),
        attempt("P", 2, "delivered", "2026-03-01 10:01:00", endpoint="a1/main", latency=41, version=2),
        attempt("P", 1, "dead", "2026-03-01 10:00:00", endpoint="a1/backup", error="timeout", version=2),
        attempt("K", 1, "delivered", "2026-03-01 11:00:00", endpoint="a1/main", latency=12),
        attempt("F", 1, "delivered", "2026-03-01 11:00:00", endpoint="a1/main", latency=12),  # another order
    ], column_names=DELIVERY_COLS)
    # P's first attempt consumed twice by the sink: one row.
    traced.insert("outbound_deliveries", [attempt("P", 1, "retry", "2026-03-01 10:00:00.250", endpoint="a1/main",
                                                  status=503, latency=87, error="http_5xx", version=2)],
                  column_names=DELIVERY_COLS)
    return traced


def test_trace_lists_the_deliveries_of_the_conversions_found(delivered: Any) -> None:
    from sinks.queries import describe_delivery

    deliveries = trace(delivered, "P")["deliveries"]
    assert [(d["conversion_id"], d["endpoint"], d["attempt"], d["outcome"]) for d in deliveries] == [
        ("K", "a1/main", 1, "delivered"), ("P", "a1/backup", 1, "dead"), ("P", "a1/main", 1, "retry"),
        ("P", "a1/main", 2, "delivered")]
    assert [describe_delivery(d) for d in deliveries] == [
        "K v1 -> a1/main attempt 1 delivered: status 200, 12 ms, error -, at 2026-03-01T11:00:00.000Z; "
        "https://a1.example/pb?cid=K&sig=REDACTED",
        "P v2 -> a1/backup attempt 1 dead: status -, -, error timeout, at 2026-03-01T10:00:00.000Z; "
        "https://a1.example/pb?cid=P&sig=REDACTED",
        "P v2 -> a1/main attempt 1 retry: status 503, 87 ms, error http_5xx, at 2026-03-01T10:00:00.250Z; "
        "https://a1.example/pb?cid=P&sig=REDACTED",
        "P v2 -> a1/main attempt 2 delivered: status 200, 41 ms, error -, at 2026-03-01T10:01:00.000Z; "
        "https://a1.example/pb?cid=P&sig=REDACTED",
    ]
    assert [d["conversion_id"] for d in trace(delivered, "F")["deliveries"]] == ["F"]
    assert trace(delivered, "OLD")["deliveries"] == []


def test_trace_command_prints_the_deliveries(delivered: Any, clickhouse: ClickHouseService, ch_database: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import app.commands.sink as command

    monkeypatch.setattr(command, "clickhouse_url", lambda settings: clickhouse.url)
    assert command._trace(argparse.Namespace(id="P", database=ch_database, json=False), None) == 0
    out = capsys.readouterr().out
    section = out.split("deliveries (4)\n")[1]
    assert "  P v2 -> a1/main attempt 1 retry: status 503, 87 ms, error http_5xx, at 2026-03-01T10:00:00.250Z; " \
           "https://a1.example/pb?cid=P&sig=REDACTED\n" in section
    assert "sig=REDACTED" in section and "a1/backup attempt 1 dead: status -, -, error timeout" in section
