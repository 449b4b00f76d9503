"""The commission part of the partner file: account, affiliates, payout rules, caps, quality, clawback."""

from __future__ import annotations

import textwrap
from dataclasses import FrozenInstanceError
from decimal import Decimal
from pathlib import Path

import pytest

from postback.partners import (
    Account,
    Affiliate,
    Caps,
    PartnerConfig,
    PartnerConfigError,
    PayoutRule,
    Quality,
    Tier,
    load_partner_config,
    parse_partner_config,
)

EXAMPLE = Path(__file__).parents[2] / "deploy" / "partners.example.toml"
BASE = f"""
[advertisers.acme]
secrets = {{ k1 = "{"s" * 16}" }}
[offers.o1]
advertiser_id = "acme"
"""


def parse(extra: str) -> PartnerConfig:
    return parse_partner_config(BASE + textwrap.dedent(extra), "test.toml")


def error(extra: str) -> PartnerConfigError:
    with pytest.raises(PartnerConfigError) as info:
        parse(extra)
    return info.value


def test_defaults() -> None:
    cfg = parse("")
    assert cfg.account == Account("USD", "UTC") and cfg.affiliates == {}
    offer = cfg.offer("o1")
    assert offer is not None
    assert offer.payouts == {} and offer.caps is None and offer.affiliate_caps is None
    assert offer.quality is None and offer.clawback_days == 30
    assert cfg.affiliate("a1") is None and cfg.affiliate(None) is None
    assert PartnerConfig().account == Account()


def test_full_commission_config() -> None:
    cfg = parse("""
        clawback_days = 45
        [offers.o1.payouts.purchase]
        type = "cpa_plus_revshare"
        amount = "5.00"
        currency = "USD"
        percent = "10"
        tiers = [ { min_approved = 100, amount = "6.00", percent = "12" }, { min_approved = 10, percent = "11" } ]
        [offers.o1.payouts."custom:vip"]
        type = "revshare"
        percent = "2.5"
        [offers.o1.caps]
        daily_conversions = 100
        monthly_conversions = 1000
        daily_payout = "500.00"
        monthly_payout = "10000"
        [offers.o1.affiliate_caps]
        daily_conversions = 10
        on_cap = "reject"
        [offers.o1.quality]
        min_click_to_conversion_s = 10
        max_click_to_conversion_s = 2592000
        max_conversions_per_click = 1
        [account]
        reporting_currency = "EUR"
        timezone = "Europe/Berlin"
        [affiliates.aff-1]
        name = "Affiliate One"
        [affiliates.aff-1.payouts.o1.purchase]
        type = "cpa"
        amount = "7.50"
        currency = "EUR"
        [affiliates.aff-2]
        status = "paused"
    """)
    assert cfg.account == Account("EUR", "Europe/Berlin")
    offer = cfg.offer("o1")
    assert offer is not None and offer.clawback_days == 45
    rule = offer.payouts["purchase"]
    assert rule == PayoutRule("cpa_plus_revshare", Decimal("5.00"), "USD", Decimal("10"),
                              (Tier(10, None, Decimal("11")), Tier(100, Decimal("6.00"), Decimal("12"))))
    assert rule.tier_for(9) is None and rule.tier_for(10).min_approved == 10 and rule.tier_for(150).min_approved == 100
    assert offer.payouts["custom:vip"] == PayoutRule("revshare", None, None, Decimal("2.5"))
    assert offer.caps == Caps(100, 1000, Decimal("500.00"), Decimal("10000"), "hold") and offer.caps.has_payout_caps
    assert offer.affiliate_caps == Caps(daily_conversions=10, on_cap="reject")
    assert not offer.affiliate_caps.has_payout_caps
    assert offer.quality == Quality(10, 2592000, 1)
    one, two = cfg.affiliate("aff-1"), cfg.affiliate("aff-2")
    assert one == Affiliate("aff-1", "Affiliate One", "active",
                            {"o1": {"purchase": PayoutRule("cpa", Decimal("7.50"), "EUR", None)}})
    assert one.override("o1", "purchase").amount == Decimal("7.50") and one.override("o1", "lead") is None
    assert one.override("o2", "purchase") is None and not one.paused
    assert two is not None and two.name == "aff-2" and two.paused
    with pytest.raises(TypeError):
        offer.payouts["lead"] = rule  # type: ignore[index]
    with pytest.raises(TypeError):
        one.payouts["o1"]["lead"] = rule  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        cfg.account.timezone = "UTC"  # type: ignore[misc]


def test_example_file_has_the_commission_sections() -> None:
    cfg = load_partner_config(EXAMPLE)
    assert cfg.account.reporting_currency == "USD" and cfg.account.timezone == "Europe/Berlin"
    assert len(cfg.affiliates) == 2 and sum(a.paused for a in cfg.affiliates.values()) == 1
    kinds = {rule.kind for offer in cfg.offers.values() for rule in offer.payouts.values()}
    assert kinds == {"cpa", "revshare", "cpa_plus_revshare"}
    assert any(rule.tiers for offer in cfg.offers.values() for rule in offer.payouts.values())
    assert any(o.caps for o in cfg.offers.values()) and any(o.affiliate_caps for o in cfg.offers.values())
    assert any(o.quality for o in cfg.offers.values())
    assert any(o.clawback_days != 30 for o in cfg.offers.values())
    assert any(a.payouts for a in cfg.affiliates.values())


RULE = '[offers.o1.payouts.purchase]\ntype = "cpa"\ncurrency = "USD"\n'


@pytest.mark.parametrize("extra, path, fragment", [
    # account
    ('[account]\ncurrency = "USD"', "account", "unknown key 'currency'"),
    ('[account]\nreporting_currency = "usd"', "account.reporting_currency", "ISO 4217"),
    ('[account]\nreporting_currency = "EURO"', "account.reporting_currency", "ISO 4217"),
    ('[account]\ntimezone = "Mars/Olympus"', "account.timezone", "unknown timezone"),
    ('[account]\ntimezone = ""', "account.timezone", "unknown timezone"),
    ('[account]\ntimezone = "../etc/passwd"', "account.timezone", "unknown timezone"),
    ('[account]\ntimezone = 1', "account.timezone", "must be a string"),
    # payout rules
    (RULE + 'amount = 5.0', "offers.o1.payouts.purchase.amount", "TOML float"),
    (RULE + 'amount = 5.0', "offers.o1.payouts.purchase.amount", "quoted"),
    (RULE + 'amount = 5', "offers.o1.payouts.purchase.amount", "TOML integer"),
    (RULE + 'amount = "5,00"', "offers.o1.payouts.purchase.amount", "not a decimal number"),
    (RULE + 'amount = "-1"', "offers.o1.payouts.purchase.amount", "not a decimal number >= 0"),
    (RULE + 'amount = "1.0000001"', "offers.o1.payouts.purchase.amount", "6 decimal"),
    (RULE + 'amount = "1e3"', "offers.o1.payouts.purchase.amount", "not a decimal number"),
    ('[offers.o1.payouts.purchase]\ntype = "cpa"\namount = "1"\ncurrency = "Dollar"',
     "offers.o1.payouts.purchase.currency", "ISO 4217"),
    ('[offers.o1.payouts.purchase]\namount = "1"', "offers.o1.payouts.purchase.type", "required"),
    ('[offers.o1.payouts.purchase]\ntype = "cpl"', "offers.o1.payouts.purchase.type", "unknown payout type"),
    ('[offers.o1.payouts.purchase]\ntype = "revshares"\npercent = "1"', "offers.o1.payouts.purchase.type",
     "did you mean 'revshare'"),
    ('[offers.o1.payouts.purchase]\ntype = "revshare"', "offers.o1.payouts.purchase.percent", "required"),
    ('[offers.o1.payouts.purchase]\ntype = "revshare"\npercent = 10.0', "offers.o1.payouts.purchase.percent",
     "TOML float"),
    ('[offers.o1.payouts.purchase]\ntype = "revshare"\npercent = "101"', "offers.o1.payouts.purchase.percent",
     "between 0 and 100"),
    ('[offers.o1.payouts.purchase]\ntype = "revshare"\npercent = "1"\namount = "1"',
     "offers.o1.payouts.purchase.amount", "not allowed for type 'revshare'"),
    ('[offers.o1.payouts.purchase]\ntype = "cpa"\namount = "1"', "offers.o1.payouts.purchase.currency", "required"),
    ('[offers.o1.payouts.purchase]\ntype = "cpa"\ncurrency = "USD"', "offers.o1.payouts.purchase.amount",
     "required"),
    (RULE + 'amount = "1"\npercent = "1"', "offers.o1.payouts.purchase.percent", "not allowed for type 'cpa'"),
    ('[offers.o1.payouts.purchase]\ntype = "cpa_plus_revshare"\namount = "1"\ncurrency = "USD"',
     "offers.o1.payouts.purchase.percent", "required"),
    (RULE + 'amount = "1"\nbonus = "1"', "offers.o1.payouts.purchase", "unknown key 'bonus'"),
    ('[offers.o1.payouts.sale]\ntype = "cpa"\namount = "1"\ncurrency = "USD"', "offers.o1.payouts",
     "not a canonical event"),
    ('[offers.o1]\npayouts = 1', "offers.o1.payouts", "must be a table"),
    # tiers
    (RULE + 'amount = "1"\ntiers = [ { min_approved = 10 } ]', "offers.o1.payouts.purchase.tiers[0]",
     "amount or percent"),
    (RULE + 'amount = "1"\ntiers = [ { amount = "2" } ]', "offers.o1.payouts.purchase.tiers[0].min_approved",
     "required"),
    (RULE + 'amount = "1"\ntiers = [ { min_approved = 0, amount = "2" } ]',
     "offers.o1.payouts.purchase.tiers[0].min_approved", "between 1 and"),
    (RULE + 'amount = "1"\ntiers = [ { min_approved = 5, amount = 2.0 } ]',
     "offers.o1.payouts.purchase.tiers[0].amount", "TOML float"),
    (RULE + 'amount = "1"\ntiers = [ { min_approved = 5, percent = "2" } ]',
     "offers.o1.payouts.purchase.tiers[0].percent", "no revshare percent"),
    ('[offers.o1.payouts.purchase]\ntype = "revshare"\npercent = "1"\ntiers = [ { min_approved = 5, amount = "2" } ]',
     "offers.o1.payouts.purchase.tiers[0].amount", "no cpa amount"),
    (RULE + 'amount = "1"\ntiers = [ { min_approved = 5, amount = "2" }, { min_approved = 5, amount = "3" } ]',
     "offers.o1.payouts.purchase.tiers[1].min_approved", "already starts at 5"),
    (RULE + 'amount = "1"\ntiers = [ { min_approved = 5, amount = "2", level = 1 } ]',
     "offers.o1.payouts.purchase.tiers[0]", "unknown key 'level'"),
    (RULE + 'amount = "1"\ntiers = { min_approved = 5 }', "offers.o1.payouts.purchase.tiers", "array of tables"),
    # caps
    ('[offers.o1.caps]\non_cap = "hold"', "offers.o1.caps", "sets no limit"),
    ('[offers.o1.caps]\ndaily_conversions = 0', "offers.o1.caps.daily_conversions", "between 1 and"),
    ('[offers.o1.caps]\ndaily_conversions = "10"', "offers.o1.caps.daily_conversions", "must be an integer"),
    ('[offers.o1.caps]\ndaily_payout = 500.0', "offers.o1.caps.daily_payout", "TOML float"),
    ('[offers.o1.caps]\nmonthly_payout = "0"', "offers.o1.caps.monthly_payout", "greater than 0"),
    ('[offers.o1.caps]\ndaily_conversions = 1\non_cap = "drop"', "offers.o1.caps.on_cap", "unknown action"),
    ('[offers.o1.affiliate_caps]\nweekly_conversions = 1', "offers.o1.affiliate_caps",
     "unknown key 'weekly_conversions'"),
    # quality
    ('[offers.o1.quality]', "offers.o1.quality", "sets no rule"),
    ('[offers.o1.quality]\nmin_click_to_conversion_s = 100\nmax_click_to_conversion_s = 10',
     "offers.o1.quality.min_click_to_conversion_s", "above max_click_to_conversion_s"),
    ('[offers.o1.quality]\nmax_conversions_per_click = 0', "offers.o1.quality.max_conversions_per_click",
     "between 1 and"),
    ('[offers.o1.quality]\nmin_click_to_conversion_s = -1', "offers.o1.quality.min_click_to_conversion_s",
     "between 0 and"),
    ('[offers.o1.quality]\nmax_click_to_conversion_s = 1.5', "offers.o1.quality.max_click_to_conversion_s",
     "must be an integer"),
    # clawback
    ('[offers.o1]\nclawback_days = 3651', "offers.o1.clawback_days", "between 0 and 3650"),
    ('[offers.o1]\nclawback_days = -1', "offers.o1.clawback_days", "between 0 and 3650"),
    # affiliates
    ('[affiliates."bad id"]\nname = "x"', 'affiliates."bad id"', "invalid affiliate id"),
    ('[affiliates.a1]\nstatus = "banned"', "affiliates.a1.status", "unknown status"),
    ('[affiliates.a1]\nname = " "', "affiliates.a1.name", "blank"),
    ('[affiliates.a1]\nemail = "x"', "affiliates.a1", "unknown key 'email'"),
    ('[affiliates.a1.payouts.o2.purchase]\ntype = "cpa"\namount = "1"\ncurrency = "USD"',
     "affiliates.a1.payouts.o2", "unknown offer 'o2'"),
    ('[affiliates.a1.payouts.o1.sale]\ntype = "cpa"\namount = "1"\ncurrency = "USD"',
     "affiliates.a1.payouts.o1", "not a canonical event"),
    ('[affiliates.a1.payouts.o1.purchase]\ntype = "cpa"\namount = 7.5\ncurrency = "EUR"',
     "affiliates.a1.payouts.o1.purchase.amount", "TOML float"),
    ('[affiliates.a1.payouts.o1.purchase]\ntype = "revshare"',
     "affiliates.a1.payouts.o1.purchase.percent", "required"),
    ('affiliates = 1', "affiliates", "must be a table"),
])
def test_errors_name_file_table_and_key(extra: str, path: str, fragment: str) -> None:
    if extra.startswith("affiliates ="):  # a top-level key comes before every table
        with pytest.raises(PartnerConfigError) as info:
            parse_partner_config(extra + BASE, "test.toml")
        e = info.value
    else:  # keys of [offers.o1] continue BASE, which ends with that table
        e = error(extra.removeprefix("[offers.o1]\n"))
    assert e.source == "test.toml" and e.path == path
    assert str(e).startswith(f"test.toml: {path}: ")
    assert fragment in str(e)
