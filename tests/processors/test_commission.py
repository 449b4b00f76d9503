"""The commission engine: rules, tiers, caps, quality, clawbacks, FX and replays (pure, no Kafka)."""

from __future__ import annotations

import itertools
import json
import textwrap
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from postback.fx import FxRate, FxRates
from postback.partners import PartnerConfig, parse_partner_config
from processors.commission import PAYOUT_REASONS, commission, recompute_fx

SECRET = "s" * 16
DAY_MS = 86_400_000
T0 = int(datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc).timestamp() * 1000)
_ids = itertools.count(1)

FIELDS = ("payout", "payout_currency", "payout_status", "payout_reason", "payout_rule", "reporting_currency",
          "revenue_reporting", "payout_reporting", "revenue_fx_rate", "revenue_fx_date", "payout_fx_rate",
          "payout_fx_date", "fx_status", "cap_decision")


def config(offer: str = "", extra: str = "", account: str = "") -> PartnerConfig:
    text = f"""
[advertisers.acme]
secrets = {{ k1 = "{SECRET}" }}
{textwrap.dedent(account)}
[offers.o1]
advertiser_id = "acme"
{textwrap.dedent(offer)}
{textwrap.dedent(extra)}
"""
    return parse_partner_config(text, "test.toml")


CPA = """
[offers.o1.payouts.purchase]
type = "cpa"
amount = "5.00"
currency = "USD"
"""


def conv(**overrides: Any) -> dict[str, Any]:
    n = next(_ids)
    base: dict[str, Any] = {
        "conversion_id": f"conv-{n}", "receipt_id": f"r-{n}", "version": 1, "advertiser_id": "acme",
        "offer_id": "o1", "affiliate_id": "a1", "click_id": f"click-{n}", "event": "purchase",
        "status": "approved", "order_id": f"order-{n}", "amount": Decimal("100.00"), "currency": "USD",
        "sign": 1, "event_time_ms": T0, "received_at_ms": T0, "clicked_at_ms": T0 - 60_000,
        "click_to_conversion_s": 60, "attributed": True, "attribution": "attributed",
    }
    base.update(overrides)
    return base


def run(c: dict[str, Any], cfg: PartnerConfig, state: dict[str, Any] | None = None,
        fx: FxRates | None = None) -> dict[str, Any]:
    out = commission(c, cfg, {} if state is None else state, fx or FxRates(), 1_000)
    assert set(FIELDS) <= set(out)
    assert out["payout_reason"] is None or out["payout_reason"] in PAYOUT_REASONS
    return out


def new_version(c: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return dict(c, version=c["version"] + 1, receipt_id=c["receipt_id"] + "+", **changes)


def assert_json(state: dict[str, Any]) -> None:
    json.dumps(state)  # JSON-serialisable values only


# ------------------------------------------------------------------ rule types


def test_cpa() -> None:
    c = conv()
    out = run(c, config(CPA))
    assert out["payout"] == Decimal("5.00") and out["payout_currency"] == "USD"
    assert out["payout_status"] == "payable" and out["payout_reason"] is None
    assert out["payout_rule"] == "offer o1 purchase: cpa 5.00 USD"
    assert out["reporting_currency"] == "USD" and out["fx_status"] == "ok"
    assert out["revenue_reporting"] == Decimal("100.00") and out["payout_reporting"] == Decimal("5.00")
    assert out["revenue_fx_rate"] == 1 and out["revenue_fx_date"] == "2026-12-07"
    assert out["cap_decision"] is None
    # a new dict; the input is untouched
    assert out is not c and "payout" not in c and {k: out[k] for k in c} == c


def test_revshare_in_the_revenue_currency() -> None:
    cfg = config("""
[offers.o1.payouts.purchase]
type = "revshare"
percent = "12.5"
""")
    fx = FxRates([FxRate("2026-12-01", "EUR", Decimal("1.10"))])
    out = run(conv(amount=Decimal("80.00"), currency="EUR"), cfg, fx=fx)
    assert out["payout"] == Decimal("10.00") and out["payout_currency"] == "EUR"
    assert out["payout_rule"] == "offer o1 purchase: revshare 12.5% of 80.00 EUR"
    assert out["payout_reporting"] == Decimal("11.00") and out["revenue_reporting"] == Decimal("88.00")
    assert out["payout_fx_rate"] == Decimal("1.10") and out["payout_fx_date"] == "2026-12-01"


def test_revshare_without_revenue_pays_zero() -> None:
    cfg = config('[offers.o1.payouts.purchase]\ntype = "revshare"\npercent = "10"\n')
    out = run(conv(amount=None, currency=None), cfg)
    assert out["payout"] == 0 and out["payout_currency"] == "USD" and out["payout_status"] == "payable"
    assert out["revenue_reporting"] is None and out["revenue_fx_rate"] is None and out["fx_status"] == "ok"


def test_cpa_plus_revshare_same_currency() -> None:
    cfg = config('[offers.o1.payouts.purchase]\ntype = "cpa_plus_revshare"\namount = "2.00"\n'
                 'currency = "USD"\npercent = "10"\n')
    out = run(conv(amount=Decimal("33.33")), cfg)
    assert out["payout"] == Decimal("5.33")  # 2.00 + 3.333 -> 5.333 -> 5.33
    assert out["payout_rule"] == "offer o1 purchase: cpa_plus_revshare 2.00 USD + 10% of 33.33 USD"


def test_cpa_plus_revshare_converts_the_revshare_part_through_the_reporting_currency() -> None:
    cfg = config('[offers.o1.payouts.purchase]\ntype = "cpa_plus_revshare"\namount = "2.00"\n'
                 'currency = "EUR"\npercent = "10"\n')
    fx = FxRates([FxRate("2026-12-07", "EUR", Decimal("1.25")), FxRate("2026-12-07", "GBP", Decimal("1.50"))])
    # 10% of 100 GBP = 10 GBP = 15 USD = 12 EUR; + 2 EUR = 14 EUR = 17.50 USD
    out = run(conv(amount=Decimal("100.00"), currency="GBP"), cfg, fx=fx)
    assert out["payout"] == Decimal("14.00") and out["payout_currency"] == "EUR"
    assert out["payout_reporting"] == Decimal("17.50") and out["revenue_reporting"] == Decimal("150.00")
    assert "12.00 EUR at GBP 1.50" in out["payout_rule"]
    # without the GBP rate the payout cannot be known: held, fx_missing
    fx_eur = FxRates([FxRate("2026-12-07", "EUR", Decimal("1.25"))])
    state: dict[str, Any] = {}
    out = run(conv(amount=Decimal("100.00"), currency="GBP"), cfg, state, fx_eur)
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("hold", "fx_missing", 0)
    assert out["fx_status"] == "fx_missing" and out["revenue_reporting"] is None


def test_no_rule_and_not_attributed() -> None:
    cfg = config(CPA)
    out = run(conv(event="lead"), cfg)
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("none", "no_payout_rule", 0)
    assert out["payout_currency"] == "USD" and out["payout_reporting"] == 0
    out = run(conv(offer_id="unknown"), cfg)
    assert out["payout_reason"] == "no_payout_rule"
    for c in (conv(attributed=False), conv(affiliate_id=None)):
        out = run(c, cfg)
        assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("none", "not_attributed", 0)
        assert out["revenue_reporting"] == Decimal("100.00") and out["revenue_fx_rate"] == 1  # FX still filled


def test_affiliate_override_wins_and_paused_affiliate_is_held() -> None:
    cfg = config(CPA, """
[affiliates.a1]
name = "One"
[affiliates.a1.payouts.o1.purchase]
type = "cpa"
amount = "7.50"
currency = "USD"
[affiliates.a2]
status = "paused"
""")
    out = run(conv(), cfg)
    assert out["payout"] == Decimal("7.50")
    assert out["payout_rule"] == "affiliate a1 override offer o1 purchase: cpa 7.50 USD"
    out = run(conv(affiliate_id="a3"), cfg)  # not configured: the offer's rule
    assert out["payout"] == Decimal("5.00")
    state: dict[str, Any] = {}
    c = conv(affiliate_id="a2")
    out = run(c, cfg, state)
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("hold", "affiliate_paused", 0)
    assert out["payout_rule"] == "offer o1 purchase: cpa 5.00 USD"
    assert not any(k.startswith(("cap:", "aff:", "order:")) for k in state)


def test_status_rejected_pays_nothing() -> None:
    out = run(conv(status="rejected"), config(CPA))
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("none", "status_rejected", 0)


# ------------------------------------------------------------------ tiers


TIERED = """
[offers.o1.payouts.purchase]
type = "cpa"
amount = "5.00"
currency = "USD"
tiers = [ { min_approved = 3, amount = "6.00" }, { min_approved = 5, amount = "8.00" } ]
"""


def test_tiers_switch_on_the_nth_approved_conversion_and_reset_monthly() -> None:
    cfg, state = config(TIERED), {}
    payouts = [run(conv(), cfg, state)["payout"] for _ in range(6)]
    assert payouts == [Decimal(x) for x in ("5.00", "5.00", "6.00", "6.00", "8.00", "8.00")]
    assert state["aff:o1|a1|2026-12"] == 6
    out = run(conv(), cfg, state)
    assert out["payout_rule"] == "offer o1 purchase: tier >=5: cpa 8.00 USD"
    # pending conversions do not count, and are priced with the approved ones before them
    assert run(conv(affiliate_id="a2", status="pending"), cfg, state)["payout"] == Decimal("5.00")
    assert "aff:o1|a2|2026-12" not in state
    # a new month starts again
    jan = int(datetime(2027, 1, 1, 0, 0, tzinfo=timezone.utc).timestamp() * 1000)
    assert run(conv(event_time_ms=jan), cfg, state)["payout"] == Decimal("5.00")


def test_tier_month_is_in_the_account_timezone() -> None:
    cfg = config(TIERED, account='[account]\ntimezone = "Asia/Tokyo"\n')
    state: dict[str, Any] = {}
    late = int(datetime(2026, 11, 30, 16, 0, tzinfo=timezone.utc).timestamp() * 1000)  # Dec 1st 01:00 in Tokyo
    out = run(conv(event_time_ms=late), cfg, state)
    assert "aff:o1|a1|2026-12" in state and out["revenue_fx_date"] == "2026-12-01"


# ------------------------------------------------------------------ status changes


CAPPED = CPA + """
[offers.o1.caps]
daily_conversions = 2
"""


def test_status_changes_recompute_and_rejected_releases_cap_room() -> None:
    cfg, state = config(CAPPED), {}
    a = conv(status="pending")
    out = run(a, cfg, state)
    assert out["payout_status"] == "payable" and out["cap_decision"] == "counted offer:o1 day 2026-12-07 1/2"
    a2 = new_version(a, status="approved")
    out = run(a2, cfg, state)
    assert out["payout"] == Decimal("5.00") and out["cap_decision"] == "counted offer:o1 day 2026-12-07 1/2"
    assert state["cap:offer:o1:day:2026-12-07"]["n"] == 1 and state["aff:o1|a1|2026-12"] == 1
    a3 = new_version(a2, status="rejected")
    out = run(a3, cfg, state)
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("none", "status_rejected", 0)
    assert state["cap:offer:o1:day:2026-12-07"]["n"] == 0 and state["aff:o1|a1|2026-12"] == 0
    assert state[f"order:acme|{a['order_id']}"] == {}
    # the freed room is used by the next conversions
    assert [run(conv(), cfg, state)["payout_status"] for _ in range(3)] == ["payable", "payable", "hold"]
    assert_json(state)


def test_a_conversion_held_by_a_cap_stays_held_after_room_frees() -> None:
    cfg, state = config(CAPPED), {}
    first, second = conv(status="pending"), conv(status="pending")
    run(first, cfg, state)
    run(second, cfg, state)
    held = conv(status="pending")
    out = run(held, cfg, state)
    assert (out["payout_status"], out["payout_reason"]) == ("hold", "cap_daily_conversions")
    assert out["cap_decision"] == "over offer:o1 day 2026-12-07 2/2"
    run(new_version(first, status="rejected"), cfg, state)  # frees one place
    out = run(new_version(held, status="approved"), cfg, state)
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("hold", "cap_daily_conversions", 0)
    assert state["cap:offer:o1:day:2026-12-07"]["n"] == 1
    # only a rejected status moves it
    out = run(new_version(new_version(held), status="rejected"), cfg, state)
    assert out["payout_reason"] == "status_rejected"


# ------------------------------------------------------------------ caps


def test_conversion_caps_at_the_boundary_hold() -> None:
    cfg, state = config(CPA + "[offers.o1.caps]\ndaily_conversions = 5\n"), {}
    outs = [run(conv(), cfg, state) for _ in range(10)]
    assert [o["payout_status"] for o in outs] == ["payable"] * 5 + ["hold"] * 5
    assert {o["payout_reason"] for o in outs[5:]} == {"cap_daily_conversions"}
    assert all(o["payout"] == 0 for o in outs[5:])
    assert outs[4]["cap_decision"] == "counted offer:o1 day 2026-12-07 5/5"
    # the next day has room again
    out = run(conv(event_time_ms=T0 + DAY_MS), cfg, state)
    assert out["payout_status"] == "payable" and out["cap_decision"] == "counted offer:o1 day 2026-12-08 1/5"


def test_monthly_and_affiliate_caps_reject() -> None:
    cfg = config(CPA + """
[offers.o1.caps]
monthly_conversions = 4
[offers.o1.affiliate_caps]
daily_conversions = 2
on_cap = "reject"
""")
    state: dict[str, Any] = {}
    a1 = [run(conv(), cfg, state) for _ in range(3)]
    assert [o["payout_status"] for o in a1] == ["payable", "payable", "rejected"]
    assert a1[2]["payout_reason"] == "affiliate_cap_daily_conversions"
    assert a1[2]["cap_decision"] == "over affiliate:a1@o1 day 2026-12-07 2/2"
    assert a1[1]["cap_decision"] == ("counted offer:o1 month 2026-12 2/4; "
                                     "counted affiliate:a1@o1 day 2026-12-07 2/2")
    a2 = [run(conv(affiliate_id="a2", event_time_ms=T0 + DAY_MS), cfg, state) for _ in range(3)]
    assert [o["payout_status"] for o in a2] == ["payable", "payable", "hold"]
    assert a2[2]["payout_reason"] == "cap_monthly_conversions"


def test_payout_caps_in_the_reporting_currency() -> None:
    cfg = config(CPA + """
[offers.o1.caps]
daily_payout = "12.00"
[offers.o1.affiliate_caps]
monthly_payout = "100.00"
""")
    state: dict[str, Any] = {}
    outs = [run(conv(), cfg, state) for _ in range(4)]
    assert [o["payout_status"] for o in outs] == ["payable", "payable", "hold", "hold"]
    assert outs[2]["payout_reason"] == "cap_daily_payout"
    assert outs[2]["cap_decision"] == "over offer:o1 day 2026-12-07 payout 10.00+5.00/12.00 USD"
    assert outs[1]["cap_decision"] == ("counted offer:o1 day 2026-12-07 payout 10.00/12.00 USD; "
                                       "counted affiliate:a1@o1 month 2026-12 payout 10.00/100.00 USD")
    cfg = config(CPA + '[offers.o1.affiliate_caps]\nmonthly_payout = "10.00"\non_cap = "reject"\n')
    state = {}
    outs = [run(conv(), cfg, state) for _ in range(3)]
    assert [o["payout_status"] for o in outs] == ["payable", "payable", "rejected"]
    assert outs[2]["payout_reason"] == "affiliate_cap_monthly_payout"


def test_payout_caps_without_a_rate_hold_with_fx_missing() -> None:
    rule = '[offers.o1.payouts.purchase]\ntype = "cpa"\namount = "5.00"\ncurrency = "EUR"\n'
    out = run(conv(), config(rule + '[offers.o1.caps]\ndaily_payout = "100.00"\n'))
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("hold", "fx_missing", 0)
    # without payout caps the payout is known in its own currency and payable
    out = run(conv(), config(rule + '[offers.o1.caps]\ndaily_conversions = 100\n'))
    assert (out["payout_status"], out["payout"], out["payout_currency"]) == ("payable", Decimal("5.00"), "EUR")
    assert out["payout_reporting"] is None and out["payout_fx_rate"] is None and out["fx_status"] == "fx_missing"
    assert out["revenue_reporting"] == Decimal("100.00")


# ------------------------------------------------------------------ quality


def test_quality_rules_hold() -> None:
    cfg = config(CPA + """
[offers.o1.payouts.signup]
type = "cpa"
amount = "1.00"
currency = "USD"
[offers.o1.quality]
min_click_to_conversion_s = 10
max_click_to_conversion_s = 3600
max_conversions_per_click = 1
""")
    state: dict[str, Any] = {}
    assert run(conv(click_to_conversion_s=9), cfg, state)["payout_reason"] == "too_fast"
    assert run(conv(click_to_conversion_s=10), cfg, state)["payout_status"] == "payable"
    assert run(conv(click_to_conversion_s=3601), cfg, state)["payout_reason"] == "too_slow"
    assert run(conv(click_to_conversion_s=3600), cfg, state)["payout_status"] == "payable"
    first = conv(click_id="same")
    assert run(first, cfg, state)["payout_status"] == "payable"
    out = run(conv(click_id="same"), cfg, state)
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("hold", "max_conversions_per_click", 0)
    # another event of the same click is counted apart; a new version of the first is not a second conversion
    assert run(conv(click_id="same", event="signup"), cfg, state)["payout_status"] == "payable"
    assert run(new_version(first, status="pending"), cfg, state)["payout_status"] == "payable"
    assert state["click:same|purchase"] == 2 and state["click:same|signup"] == 1


# ------------------------------------------------------------------ clawback


def test_clawback_inside_and_outside_the_window() -> None:
    cfg = config("clawback_days = 30\n" + CPA)
    state: dict[str, Any] = {}
    sale = conv(order_id="A-1")
    run(sale, cfg, state)
    refund = conv(order_id="A-1", event="refund", sign=-1, event_time_ms=T0 + 10 * DAY_MS,
                  amount=Decimal("100.00"))
    out = run(refund, cfg, state)
    assert (out["payout"], out["payout_status"], out["payout_reason"]) == (Decimal("-5.00"), "payable", "clawback")
    assert out["payout_reporting"] == Decimal("-5.00") and out["payout_currency"] == "USD"
    assert out["payout_rule"] == "clawback of order acme|A-1: -5.00 USD paid within 30 days"
    # a chargeback after the refund takes nothing twice
    out = run(conv(order_id="A-1", event="chargeback", sign=-1, event_time_ms=T0 + 11 * DAY_MS), cfg, state)
    assert (out["payout"], out["payout_status"], out["payout_reason"]) == (0, "none", "clawback")
    # outside the window
    run(conv(order_id="B-1"), cfg, state)
    out = run(conv(order_id="B-1", event="refund", sign=-1, event_time_ms=T0 + 31 * DAY_MS), cfg, state)
    assert (out["payout"], out["payout_status"], out["payout_reason"]) == (0, "none", "clawback_window_passed")
    # replayed refund: the same record, nothing taken again
    assert run(refund, cfg, state) == run(refund, cfg, state)
    assert_json(state)


def test_a_refund_without_its_click_takes_back_from_the_order_and_takes_its_affiliate() -> None:
    """Advertisers send refunds with the order id only: no click, no offer, not attributed."""
    cfg, state = config("clawback_days = 30\n" + CPA), {}
    run(conv(order_id="D-1"), cfg, state)
    refund = conv(order_id="D-1", event="refund", sign=-1, attributed=False, affiliate_id=None, offer_id=None,
                  click_id=None, event_time_ms=T0 + DAY_MS)
    out = run(refund, cfg, state)
    assert (out["payout"], out["payout_status"], out["payout_reason"]) == (Decimal("-5.00"), "payable", "clawback")
    assert (out["affiliate_id"], out["offer_id"]) == (conv()["affiliate_id"], conv()["offer_id"])
    assert run(refund, cfg, state) == out  # a replay adopts the same, takes nothing again
    # an order nothing was paid for: not attributed, nothing to take back
    lost = run(conv(order_id="D-2", event="refund", sign=-1, attributed=False, affiliate_id=None, offer_id=None,
                    click_id=None), cfg, state)
    assert (lost["payout"], lost["payout_status"], lost["payout_reason"], lost["affiliate_id"]) == \
        (0, "none", "not_attributed", None)
    assert_json(state)


def test_a_rejected_refund_gives_the_payment_back() -> None:
    cfg, state = config(CPA), {}
    run(conv(order_id="C-1"), cfg, state)
    refund = conv(order_id="C-1", event="refund", sign=-1, status="pending")
    assert run(refund, cfg, state)["payout"] == Decimal("-5.00")
    assert run(new_version(refund, status="rejected"), cfg, state)["payout_reason"] == "status_rejected"
    assert run(conv(order_id="C-1", event="chargeback", sign=-1), cfg, state)["payout"] == Decimal("-5.00")


# ------------------------------------------------------------------ rounding and FX


@pytest.mark.parametrize("amount, currency, expected", [
    ("0.125", "USD", "0.12"), ("0.135", "USD", "0.14"), ("2.5", "JPY", "2"), ("3.5", "JPY", "4"),
    ("1.0005", "KWD", "1.000"), ("1.0015", "KWD", "1.002"),
])
def test_payout_rounds_half_even(amount: str, currency: str, expected: str) -> None:
    cfg = config('[offers.o1.payouts.purchase]\ntype = "revshare"\npercent = "100"\n',
                 account=f'[account]\nreporting_currency = "{currency}"\n')
    out = run(conv(amount=Decimal(amount), currency=currency), cfg)
    assert str(out["payout"]) == expected and str(out["payout_reporting"]) == expected
    assert out["payout_currency"] == currency


def test_fx_uses_the_newest_rate_on_or_before_the_event_day() -> None:
    rule = '[offers.o1.payouts.purchase]\ntype = "cpa"\namount = "10.00"\ncurrency = "EUR"\n'
    cfg = config(rule)
    fx = FxRates([FxRate("2026-12-01", "EUR", Decimal("1.10")), FxRate("2026-12-06", "EUR", Decimal("1.20")),
                  FxRate("2026-12-08", "EUR", Decimal("1.30"))])
    out = run(conv(amount=Decimal("50.00"), currency="EUR"), cfg, fx=fx)
    assert out["payout_fx_rate"] == Decimal("1.20") and out["payout_fx_date"] == "2026-12-06"
    assert out["payout_reporting"] == Decimal("12.00") and out["revenue_reporting"] == Decimal("60.00")
    assert out["revenue_fx_date"] == "2026-12-06" and out["fx_status"] == "ok"
    # before the first rate: missing, never 0 or 1
    early = int(datetime(2026, 11, 30, tzinfo=timezone.utc).timestamp() * 1000)
    out = run(conv(amount=Decimal("50.00"), currency="EUR", event_time_ms=early), cfg, fx=fx)
    assert out["fx_status"] == "fx_missing" and out["payout_status"] == "payable" and out["payout"] == 10
    assert out["payout_reporting"] is None and out["revenue_reporting"] is None
    assert out["payout_fx_rate"] is None and out["revenue_fx_rate"] is None


# ------------------------------------------------------------------ idempotency


def test_replaying_a_receipt_returns_the_same_record_and_changes_no_counter() -> None:
    cfg = config(TIERED + "[offers.o1.caps]\ndaily_conversions = 10\ndaily_payout = \"100.00\"\n"
                 "[offers.o1.quality]\nmax_conversions_per_click = 1\n")
    state: dict[str, Any] = {}
    c = conv()
    first = run(c, cfg, state)
    snapshot = json.loads(json.dumps(state))
    again = run(dict(c), cfg, state)
    assert again == first and json.loads(json.dumps(state)) == snapshot
    assert [type(again[k]) for k in ("payout", "payout_reporting")] == [Decimal, Decimal]
    # an older version after a newer one changes nothing either
    newer = new_version(c, status="rejected")
    latest = run(newer, cfg, state)
    snapshot = json.loads(json.dumps(state))
    assert run(c, cfg, state)["payout_status"] == latest["payout_status"] == "none"
    assert json.loads(json.dumps(state)) == snapshot
    assert_json(state)


class JsonTable(dict):  # type: ignore[type-arg]
    """A table whose values go through JSON, as a changelogged table's do."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, json.loads(json.dumps(value)))


def test_state_survives_a_json_round_trip() -> None:
    cfg = config(TIERED + '[offers.o1.caps]\ndaily_conversions = 1\n[offers.o1.quality]\nmax_conversions_per_click = 1\n')
    state = JsonTable()
    sale = conv(order_id="J-1", status="pending")
    assert run(sale, cfg, state)["payout"] == Decimal("5.00")
    assert run(new_version(sale, status="approved"), cfg, state)["payout_status"] == "payable"
    held = conv()
    assert run(held, cfg, state)["payout_reason"] == "cap_daily_conversions"
    again = run(new_version(held, status="approved"), cfg, state)
    assert (again["payout_status"], str(again["payout"])) == ("hold", "0.00")
    refund = conv(order_id="J-1", event="refund", sign=-1)
    assert run(refund, cfg, state)["payout"] == Decimal("-5.00")
    assert run(refund, cfg, state)["payout"] == Decimal("-5.00")


# ------------------------------------------------------------------ FX backfill (recompute_fx)

MIXED = """
[offers.o1.payouts.purchase]
type = "cpa_plus_revshare"
amount = "2.00"
currency = "USD"
percent = "10"
[offers.o1.caps]
daily_conversions = 2
"""
GBP = FxRate("2026-12-07", "GBP", Decimal("1.50"))
BACKFILL_AT = 5_000


def test_backfill_decides_a_held_fx_missing_conversion_again_and_replays_identically() -> None:
    cfg, state, fx = config(MIXED), JsonTable(), FxRates()
    c = conv(amount=Decimal("100.00"), currency="GBP", status="pending")
    held = run(c, cfg, state, fx)
    assert (held["payout_status"], held["payout_reason"], held["fx_status"]) == ("hold", "fx_missing", "fx_missing")
    assert state[f"conv:{c['conversion_id']}"]["in"]["amount"] == "100.00"  # kept to recompute it
    assert recompute_fx(c["conversion_id"], cfg, state, fx, BACKFILL_AT) is None  # still no rate: nothing changes
    assert "bf" not in state[f"conv:{c['conversion_id']}"]

    fx.add(GBP)
    out = recompute_fx(c["conversion_id"], cfg, state, fx, BACKFILL_AT)
    assert out is not None
    assert {k: out[k] for k in c if k != "processed_at_ms"} == c  # the same conversion, the same version
    assert (out["version"], out["processed_at_ms"]) == (1, BACKFILL_AT)
    # 2.00 USD + 10 % of 100 GBP at 1.50 USD/GBP = 17.00 USD, now payable and counted against the cap
    assert (out["payout_status"], out["payout_reason"], out["payout"]) == ("payable", None, Decimal("17.00"))
    assert (out["fx_status"], out["revenue_reporting"], out["revenue_fx_rate"], out["revenue_fx_date"]) == \
        ("ok", Decimal("150.00"), Decimal("1.50"), "2026-12-07")
    assert (out["payout_reporting"], out["payout_fx_rate"]) == (Decimal("17.00"), Decimal("1"))
    assert out["cap_decision"] == "counted offer:o1 day 2026-12-07 1/2"
    assert state["cap:offer:o1:day:2026-12-07"]["n"] == 1

    # at-least-once: the same backfill again, and the conversion's own message again, give the same record
    snapshot = json.loads(json.dumps(state))
    assert recompute_fx(c["conversion_id"], cfg, state, fx, BACKFILL_AT + 1) == out
    assert run(dict(c), cfg, state, fx) == out
    assert json.loads(json.dumps(state)) == snapshot
    assert [type(out[k]) for k in ("payout", "payout_reporting", "amount")] == [Decimal] * 3

    # the cap room it took is real: one more fits, the next is held
    assert [run(conv(), cfg, state, fx)["payout_status"] for _ in range(2)] == ["payable", "hold"]


def test_backfill_keeps_a_payable_decision_and_only_adds_the_reporting_amounts() -> None:
    rule = '[offers.o1.payouts.purchase]\ntype = "cpa"\namount = "5.00"\ncurrency = "EUR"\n'
    cfg = config(rule + "[offers.o1.caps]\ndaily_conversions = 1\n")
    state, fx = JsonTable(), FxRates()
    c = conv(amount=Decimal("80.00"), currency="EUR", order_id="B-1")
    first = run(c, cfg, state, fx)
    assert (first["payout_status"], first["payout"], first["fx_status"]) == ("payable", Decimal("5.00"), "fx_missing")
    assert first["payout_reporting"] is None and first["revenue_reporting"] is None
    fx.add(FxRate("2026-12-01", "EUR", Decimal("1.10")))
    out = recompute_fx(c["conversion_id"], cfg, state, fx, BACKFILL_AT)
    assert out is not None
    same = ("payout", "payout_currency", "payout_status", "payout_reason", "payout_rule", "cap_decision")
    assert {k: out[k] for k in same} == {k: first[k] for k in same}
    assert (out["fx_status"], out["revenue_reporting"], out["payout_reporting"], out["payout_fx_date"]) == \
        ("ok", Decimal("88.00"), Decimal("5.50"), "2026-12-01")
    assert state["cap:offer:o1:day:2026-12-07"] == {"n": 1, "p": "5.50", "at": 1_000}  # counted once, payout added
    # a later refund takes back what the payment was worth in the reporting currency
    refund = run(conv(order_id="B-1", event="refund", sign=-1, amount=Decimal("80.00"), currency="EUR"), cfg,
                 state, fx)
    assert (refund["payout"], refund["payout_reporting"]) == (Decimal("-5.00"), Decimal("-5.50"))


def test_backfill_ignores_conversions_not_waiting_for_a_rate() -> None:
    cfg, state = config(MIXED), {}
    c = conv()
    assert run(c, cfg, state)["fx_status"] == "ok"
    assert "in" not in state[f"conv:{c['conversion_id']}"]  # the input is kept only while it waits
    snapshot = json.loads(json.dumps(state))
    assert recompute_fx(c["conversion_id"], cfg, state, FxRates(), BACKFILL_AT) is None
    assert recompute_fx("no-such-conversion", cfg, state, FxRates(), BACKFILL_AT) is None
    assert json.loads(json.dumps(state)) == snapshot


def test_a_status_update_after_a_backfill_is_a_new_version_as_usual() -> None:
    cfg, state, fx = config(MIXED), JsonTable(), FxRates()
    c = conv(amount=Decimal("100.00"), currency="GBP", status="pending")
    run(c, cfg, state, fx)
    fx.add(GBP)
    assert recompute_fx(c["conversion_id"], cfg, state, fx, BACKFILL_AT)["payout_status"] == "payable"
    approved = run(new_version(c, status="approved"), cfg, state, fx)
    assert (approved["version"], approved["payout_status"], approved["payout"]) == (2, "payable", Decimal("17.00"))
    assert state["cap:offer:o1:day:2026-12-07"]["n"] == 1  # the backfill's count was undone, then counted again
    assert "in" not in state[f"conv:{c['conversion_id']}"] and "bf" not in state[f"conv:{c['conversion_id']}"]
    assert recompute_fx(c["conversion_id"], cfg, state, fx, BACKFILL_AT + 1) is None  # superseded
    rejected = run(new_version(new_version(c), status="rejected"), cfg, state, fx)
    assert (rejected["version"], rejected["payout_reason"]) == (3, "status_rejected")
    assert state["cap:offer:o1:day:2026-12-07"]["n"] == 0


def test_a_new_version_decides_a_hold_for_a_missing_rate_afresh() -> None:
    cfg, state, fx = config(MIXED), {}, FxRates()
    c = conv(amount=Decimal("100.00"), currency="GBP", status="pending")
    assert run(c, cfg, state, fx)["payout_reason"] == "fx_missing"
    fx.add(GBP)  # the rate came before the advertiser's status update: no backfill needed for it
    out = run(new_version(c, status="approved"), cfg, state, fx)
    assert (out["payout_status"], out["payout"], out["fx_status"]) == ("payable", Decimal("17.00"), "ok")
