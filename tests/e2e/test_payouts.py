"""Payouts end to end: signed traffic through HTTP only, payouts read back from ClickHouse.

The expected payouts are computed here by hand from the traffic and the rules below (not
by the engine): a CPA offer with a daily cap that the traffic exceeds, a revshare offer in
EUR converted at a loaded FX rate, a paused affiliate, and a refund sent with the order id
only (no click) after its purchase was paid. ClickHouse's `v_payouts_daily` must report
the same net payout per affiliate and offer, to the cent, in the reporting currency.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest

from app.commands.fx import publish_rates
from deploy.providers import ClickHouseService, KafkaService
from postback.fx import FxRate

from .conftest import SECRET, Pipeline, eventually, http_get, running_pipeline, signed_query

WAIT_S = 90.0
CAP = 4
EUR_RATE = Decimal("1.20")
PARTNERS = f"""
[account]
reporting_currency = "USD"
timezone = "UTC"

[advertisers.shop]
secrets = {{ k1 = "{SECRET}" }}

[affiliates.aff-a]
name = "A"
[affiliates.aff-b]
name = "B"
[affiliates.aff-p]
name = "Paused"
status = "paused"

[offers.off-cpa]
advertiser_id = "shop"
[offers.off-cpa.payouts.purchase]
type = "cpa"
amount = "3.00"
currency = "USD"
[offers.off-cpa.caps]
daily_conversions = {CAP}
on_cap = "reject"

[offers.off-rev]
advertiser_id = "shop"
clawback_days = 30
[offers.off-rev.payouts.purchase]
type = "revshare"
percent = "10"
"""


def _cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)


@pytest.fixture(scope="module")
def pipe(kafka: KafkaService, clickhouse: ClickHouseService,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with running_pipeline(tmp_path_factory.mktemp("payouts"), kafka.bootstrap_servers, clickhouse.url,
                          partners_toml=PARTNERS) as pipeline:
        yield pipeline


def _click(pipe: Pipeline, offer: str, affiliate: str) -> str:
    resp = http_get(f"{pipe.url}/click?offer_id={offer}&affiliate_id={affiliate}")
    assert resp.status == 200, (resp.status, resp.body)
    return resp.json()["click_id"]


def _postback(pipe: Pipeline, params: list[tuple[str, str]]) -> str:
    resp = pipe.get("/postback?" + signed_query(params, kid="k1"))
    assert resp.status == 202, (resp.status, resp.body)
    return resp.json()["receipt_id"]


def _purchase(pipe: Pipeline, offer: str, affiliate: str, amount: str, currency: str) -> tuple[str, str]:
    order = f"{offer}-{uuid.uuid4().hex[:8]}"
    click = _click(pipe, offer, affiliate)
    return order, _postback(pipe, [("advertiser_id", "shop"), ("event", "purchase"), ("click_id", click),
                                   ("order_id", order), ("amount", amount), ("currency", currency)])


def test_clickhouse_payouts_equal_the_rules_applied_by_hand(pipe: Pipeline) -> None:
    assert publish_rates(pipe.bootstrap, pipe.prefix, [FxRate("2000-01-01", "EUR", EUR_RATE)], "USD") == 0
    eventually(lambda: pipe.query("SELECT count() AS n FROM fx_rates FINAL WHERE currency = 'EUR'")[0]["n"] == 1,
               WAIT_S, f"the EUR rate in fx_rates\n{pipe.logs()}")

    receipts = [_purchase(pipe, "off-cpa", "aff-p", "10.00", "USD")[1]]  # paused: held, uses no cap room
    receipts += [_purchase(pipe, "off-cpa", "aff-a", "10.00", "USD")[1] for _ in range(CAP + 2)]
    rev = [_purchase(pipe, "off-rev", "aff-b", amount, "EUR") for amount in ("50.00", "20.25", "10.10")]
    receipts += [receipt for _, receipt in rev]

    def decided(wanted: list[str]) -> list[dict[str, Any]] | None:
        rows = pipe.query("SELECT receipt_id, affiliate_id, offer_id, payout, payout_currency, payout_status, "
                          "payout_reason, payout_reporting, fx_status FROM v_payouts "
                          "WHERE receipt_id IN {r:Array(String)}", {"r": wanted})
        return rows if len(rows) == len(wanted) else None

    eventually(lambda: decided(receipts), WAIT_S, f"the payouts of {len(receipts)} conversions\n{pipe.logs()}")
    # The refund of the first EUR order, sent as advertisers do: the order id only, no click, no offer.
    refunded_order = rev[0][0]
    refund = _postback(pipe, [("advertiser_id", "shop"), ("event", "refund"), ("order_id", refunded_order),
                              ("amount", "50.00"), ("currency", "EUR")])
    rows = {r["receipt_id"]: r for r in eventually(lambda: decided(receipts + [refund]), WAIT_S,
                                                    f"the refund's payout\n{pipe.logs()}")}

    # By hand: cap of 4 at 3.00 USD; 10 % of each EUR revenue, half-even to the cent, then at 1.20
    # to USD; the refund takes back exactly what was paid for its order, from aff-b on off-rev.
    paid_eur = [_cents(Decimal(a) / 10) for a in ("50.00", "20.25", "10.10")]
    assert paid_eur == [Decimal("5.00"), Decimal("2.02"), Decimal("1.01")]  # 2.025 -> 2.02 (half-even)
    expected = {("aff-a", "off-cpa"): CAP * Decimal("3.00"),
                ("aff-b", "off-rev"): sum(_cents(p * EUR_RATE) for p in paid_eur) - _cents(paid_eur[0] * EUR_RATE),
                ("aff-p", "off-cpa"): Decimal("0")}

    statuses = sorted((r["payout_status"], r["payout_reason"]) for r in rows.values()
                      if r["offer_id"] == "off-cpa" and r["affiliate_id"] == "aff-a")
    assert statuses == [("payable", None)] * CAP + [("rejected", "cap_daily_conversions")] * 2
    assert (rows[receipts[0]]["payout_status"], rows[receipts[0]]["payout_reason"]) == ("hold", "affiliate_paused")
    clawback = rows[refund]
    assert (clawback["affiliate_id"], clawback["offer_id"], clawback["payout_reason"]) == ("aff-b", "off-rev",
                                                                                            "clawback")
    assert (clawback["payout"], clawback["payout_currency"]) == (-paid_eur[0], "EUR")
    assert all(r["fx_status"] == "ok" for r in rows.values())

    daily = pipe.query("SELECT affiliate_id, offer_id, sum(net_payout) AS net FROM v_payouts_daily "
                       "WHERE reporting_currency = 'USD' GROUP BY affiliate_id, offer_id")
    got = {(r["affiliate_id"], r["offer_id"]): Decimal(r["net"]) for r in daily}
    assert got == expected, (got, expected)
    # The same order, traced: purchase paid, refund clawed back, in one place.
    trace = pipe.query("SELECT event, payout FROM v_payouts WHERE order_id = {o:String} ORDER BY event",
                       {"o": refunded_order})
    assert [(r["event"], Decimal(r["payout"])) for r in trace] == [("purchase", paid_eur[0]),
                                                                   ("refund", -paid_eur[0])]
