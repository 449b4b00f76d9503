"""The aliased view of one postback (postback.partner_view): what every stage reads.

read() applies aliases once and then the advertiser's defaults; routing_key() is the raw
record's Kafka key and must be the very key the dedupe stage files the order under.
"""

from __future__ import annotations

import pytest

from postback.partner_view import (
    AUTH_PARAMS,
    CORE_PARAMS,
    DEFAULTABLE_PARAMS,
    SINGLETON_PARAMS,
    PartnerView,
    order_key,
    read,
    routing_key,
)
from postback.partners import Advertiser, parse_partner_config
from processors.dedupe import dedupe_key
from processors.normalize import normalize

TOKEN = "view-test-token-0123456789"

CONFIG = parse_partner_config(f"""
[advertisers.acme]
auth_modes = ["token"]
token = "{TOKEN}"
aliases = {{ et = "event", clickid = "click_id", txid = "order_id", secure = "token", sum = "amount" }}
event_map = {{ sale = "purchase" }}
defaults = {{ event = "purchase", currency = "EUR", status = "pending" }}

[advertisers.kt]
preset = "keitaro"
token = "{TOKEN}"

[advertisers.plain]
auth_modes = ["token"]
token = "{TOKEN}"
""", "view-test.toml")
ACME = CONFIG.advertisers["acme"]
KT = CONFIG.advertisers["kt"]
PLAIN = CONFIG.advertisers["plain"]


# --------------------------------------------------------------------------- read()


def test_constants_partition_the_canonical_names() -> None:
    assert AUTH_PARAMS == {"ts", "sig", "kid", "token"}
    assert not AUTH_PARAMS & CORE_PARAMS
    assert SINGLETON_PARAMS == CORE_PARAMS | AUTH_PARAMS
    assert DEFAULTABLE_PARAMS == ("event", "currency", "status", "offer_id")
    assert set(DEFAULTABLE_PARAMS) <= CORE_PARAMS


def test_read_without_advertiser_is_the_params_as_sent() -> None:
    params = [("advertiser_id", "nobody"), ("et", "sale"), ("order_id", "O1"), ("x", "1"), ("x", "2")]
    view = read(params, None)
    assert isinstance(view, PartnerView)
    assert dict(view.fields) == {"advertiser_id": "nobody", "et": "sale", "order_id": "O1", "x": "1"}
    assert dict(view.sent_as) == {"advertiser_id": "advertiser_id", "et": "et", "order_id": "order_id",
                                  "x": "x"}
    assert view.repeated == ()
    assert view.get("event") is None and view.get("x") == "1"


def test_read_applies_aliases_and_records_the_name_sent() -> None:
    params = [("advertiser_id", "acme"), ("et", "sale"), ("clickid", "C1"), ("txid", "T1"), ("sum", "9.50"),
              ("secure", TOKEN), ("utm", "mail")]
    view = read(params, ACME)
    assert view.get("event") == "sale" and view.get("click_id") == "C1" and view.get("order_id") == "T1"
    assert view.get("amount") == "9.50" and view.get("token") == TOKEN and view.get("utm") == "mail"
    assert view.sent_as["event"] == "et" and view.sent_as["click_id"] == "clickid"
    assert view.sent_as["order_id"] == "txid" and view.sent_as["token"] == "secure"
    assert view.sent_as["utm"] == "utm"
    # The alias sources are not fields of their own.
    assert not {"et", "clickid", "txid", "sum", "secure"} & set(view.fields)
    assert view.repeated == ()


def test_aliases_apply_once_not_transitively() -> None:
    adv = Advertiser("chain", aliases={"a": "order_id", "order_id": "click_id"})
    view = read([("a", "1"), ("order_id", "2")], adv)
    assert dict(view.fields) == {"order_id": "1", "click_id": "2"}
    assert dict(view.sent_as) == {"order_id": "a", "click_id": "order_id"}
    assert view.repeated == ()


def test_advertiser_id_is_read_literally_even_under_an_alias() -> None:
    """The loader refuses such an alias; read() itself never applies one either."""
    adv = Advertiser("lit", aliases={"advertiser_id": "customer_id"})
    view = read([("advertiser_id", "lit"), ("customer_id", "K9")], adv)
    assert view.get("advertiser_id") == "lit" and view.sent_as["advertiser_id"] == "advertiser_id"
    assert view.get("customer_id") == "K9" and view.repeated == ()


def test_a_singleton_sent_twice_under_any_spelling_is_repeated_and_the_first_value_wins() -> None:
    params = [("advertiser_id", "acme"), ("event", "lead"), ("et", "sale"), ("et", "refund"),
              ("txid", "T1"), ("order_id", "T2"), ("tag", "a"), ("tag", "b"), ("token", "x"), ("secure", "y")]
    view = read(params, ACME)
    assert view.get("event") == "lead" and view.sent_as["event"] == "event"
    assert view.get("order_id") == "T1" and view.sent_as["order_id"] == "txid"
    assert view.get("token") == "x" and view.sent_as["token"] == "token"
    assert view.get("tag") == "a"
    # In the order they were found, each once; `tag` is not a singleton.
    assert view.repeated == ("event", "order_id", "token")


def test_advertiser_id_sent_twice_is_repeated() -> None:
    assert read([("advertiser_id", "a"), ("advertiser_id", "b")], None).repeated == ("advertiser_id",)


def test_defaults_fill_missing_names() -> None:
    view = read([("advertiser_id", "acme"), ("txid", "T1")], ACME)
    assert view.get("event") == "purchase" and view.get("currency") == "EUR" and view.get("status") == "pending"
    assert view.sent_as["event"] == view.sent_as["currency"] == view.sent_as["status"] == "(default)"
    assert view.get("offer_id") is None and "offer_id" not in view.sent_as


def test_a_sent_value_beats_the_default_and_a_blank_one_does_not() -> None:
    view = read([("advertiser_id", "acme"), ("et", "sale"), ("currency", "usd"), ("status", " ")], ACME)
    assert (view.get("event"), view.sent_as["event"]) == ("sale", "et")
    assert (view.get("currency"), view.sent_as["currency"]) == ("usd", "currency")
    assert (view.get("status"), view.sent_as["status"]) == ("pending", "(default)")
    empty = read([("advertiser_id", "acme"), ("et", "")], ACME)
    assert (empty.get("event"), empty.sent_as["event"]) == ("purchase", "(default)")


def test_a_blank_first_value_is_not_replaced_by_a_repeated_one() -> None:
    """The repeat is reported, never used: the default fills the blank first value."""
    view = read([("advertiser_id", "acme"), ("et", ""), ("event", "refund")], ACME)
    assert view.get("event") == "purchase" and view.repeated == ("event",)


def test_no_defaults_without_an_advertiser_or_configured_defaults() -> None:
    assert read([("advertiser_id", "acme")], None).get("event") is None
    assert read([("advertiser_id", "plain")], PLAIN).get("event") is None


# --------------------------------------------------------------------------- order_key()


def test_order_key_kinds_and_quoting() -> None:
    ote = ("lead",)
    assert order_key("a", "purchase", "O1", None, "C1", ote) == ("a|purchase|O1", "order")
    assert order_key("a", "renewal", "S1", "2026-03", None, ote) == ("a|renewal|S1|2026-03", "order")
    assert order_key("a", "lead", None, None, "C1", ote) == ("a|lead|click|C1", "one_time")
    assert order_key("a", "purchase", None, None, "C1", ote) is None  # not a one-time event
    assert order_key("a", "lead", None, None, None, ote) is None
    assert order_key("a", "lead", "", "", "", ote) is None
    assert order_key("a.b", "custom:x", "A/1|2 3", None, None, ote) == ("a.b|custom%3Ax|A%2F1%7C2%203", "order")


# --------------------------------------------------------------------------- routing_key()


def _keitaro(status: str, **extra: str) -> list[tuple[str, str]]:
    return [("advertiser_id", "kt"), ("subid", "C9"), ("tid", "T-1"), ("status", status), ("payout", "10"),
            ("token", TOKEN)] + list(extra.items())


def _dedupe_key(params: list[tuple[str, str]], adv: Advertiser) -> tuple[str, str]:
    return dedupe_key(normalize(params, adv), adv, "replaykey")


@pytest.mark.parametrize("status", ["lead", "sale", "rejected"])
def test_every_update_of_one_order_has_the_same_routing_key(status: str) -> None:
    params = _keitaro(status)
    key = routing_key(read(params, KT), KT)
    assert key == "kt|purchase|T-1"
    assert _dedupe_key(params, KT) == (key, "order")


def test_routing_key_reads_aliases_and_defaults_not_the_raw_names() -> None:
    # Keyed by the aliased order id (tid), not by the aliased click id (subid) nor a literal name.
    keys = {routing_key(read(_keitaro(s), KT), KT) for s in ("lead", "sale", "rejected", "rebill")}
    assert keys == {"kt|purchase|T-1"}
    other = [("advertiser_id", "kt"), ("subid", "C9"), ("tid", "T-2"), ("status", "sale")]
    assert routing_key(read(other, KT), KT) == "kt|purchase|T-2"
    # event from the alias and the event_map, then defaults.
    params = [("advertiser_id", "acme"), ("et", "sale"), ("txid", " T7 "), ("secure", TOKEN)]
    assert routing_key(read(params, ACME), ACME) == "acme|purchase|T7" == _dedupe_key(params, ACME)[0]


def test_routing_key_of_a_one_time_conversion_without_order_id() -> None:
    """Keitaro lists purchase among its one-time events: the click identifies the conversion."""
    params = [("advertiser_id", "kt"), ("subid", "C9"), ("status", "sale"), ("token", TOKEN)]
    key = routing_key(read(params, KT), KT)
    assert key == "kt|purchase|click|C9"
    assert _dedupe_key(params, KT) == (key, "one_time")
    blank_tid = params + [("tid", "  ")]
    assert routing_key(read(blank_tid, KT), KT) == key


def test_routing_key_with_a_period() -> None:
    params = [("advertiser_id", "plain"), ("event", "renewal"), ("order_id", "S/1"), ("period", "2026-04"),
              ("token", TOKEN)]
    key = routing_key(read(params, PLAIN), PLAIN)
    assert key == "plain|renewal|S%2F1|2026-04"
    assert _dedupe_key(params, PLAIN) == (key, "order")


def test_routing_key_is_none_for_an_unmapped_event() -> None:
    params = [("advertiser_id", "kt"), ("event", "teleport"), ("tid", "T-1"), ("token", TOKEN)]
    assert routing_key(read(params, KT), KT) is None
    assert routing_key(read([("advertiser_id", "plain"), ("order_id", "O1")], PLAIN), PLAIN) is None  # no event


def test_routing_key_is_none_for_request_kind_postbacks() -> None:
    params = [("advertiser_id", "plain"), ("event", "purchase"), ("click_id", "C1"), ("token", TOKEN)]
    assert routing_key(read(params, PLAIN), PLAIN) is None
    assert _dedupe_key(params, PLAIN)[1] == "request"
    assert routing_key(read([("advertiser_id", "plain"), ("event", "purchase"), ("token", TOKEN)], PLAIN),
                       PLAIN) is None
