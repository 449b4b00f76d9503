"""Advertisers configured with platform presets, posting exactly as those platforms post, through `postback run`.

Every preset gets its documented example postback (docs/partners.md), with a click
created first through GET /click, then an exact retry, a forged token and an unknown
click id. Platforms with statuses send a status chain back to back, each request after
the previous 202, and every order's final status and net revenue are checked in
ClickHouse. Also here: the regression tests of issue 11's four problems at the HTTP
level, a stale HMAC signature under aliased names, and two updates of one order
processed against their order (the advertiser's event time decides).
"""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest

from deploy.providers import ClickHouseService, KafkaService

from .conftest import Pipeline, eventually, http_get, running_pipeline

WAIT_S = 90.0
TOKEN = "preset-e2e-token-0123456789"
HMAC_SECRET = "preset-e2e-hmac-secret-0123456789"
#: Longer than the pipeline's late-click wait (5 s in these tests).
NO_CLICK_WAIT_S = WAIT_S


def _adv(preset: str) -> str:
    return f"p-{preset}"


PARTNERS = f"""
[advertisers.p-everflow]
preset = "everflow"
token = "{TOKEN}"
event_map = {{ "12" = "lead" }}

[advertisers.p-tune]
preset = "tune"
token = "{TOKEN}"

[advertisers.p-affise]
preset = "affise"
token = "{TOKEN}"

[advertisers.p-voluum]
preset = "voluum"
token = "{TOKEN}"

[advertisers.p-redtrack]
preset = "redtrack"
token = "{TOKEN}"
event_map = {{ Upsell = "custom:upsell" }}

[advertisers.p-keitaro]
preset = "keitaro"
token = "{TOKEN}"
defaults = {{ currency = "EUR" }}

[advertisers.p-binom]
preset = "binom"
token = "{TOKEN}"

[advertisers.p-cake]
preset = "cake"
token = "{TOKEN}"
event_map = {{ "123" = "purchase" }}

# Signs with HMAC under its own parameter names.
[advertisers.p-signed]
preset = "voluum"
auth_modes = ["hmac"]
secrets = {{ k1 = "{HMAC_SECRET}" }}
aliases = {{ signature = "sig", timestamp = "ts" }}
""" + "".join(f"""
[offers.offer-{name}]
advertiser_id = "p-{name}"
""" for name in ("everflow", "tune", "affise", "voluum", "redtrack", "keitaro", "binom", "cake", "signed"))


@dataclass(frozen=True)
class Case:
    """One preset's documented postback: a template of (name, value) with {click} and {order} filled in."""

    preset: str
    template: tuple[tuple[str, str], ...]
    token_param: str
    event: str
    status: str
    amount: Decimal
    currency: str
    #: The status parameter and a back-to-back chain ending rejected, or None when the platform has no statuses.
    status_param: str | None = None
    chain: tuple[str, ...] = ()

    def params(self, click_id: str, order_id: str, token: str = TOKEN, **override: str) -> list[tuple[str, str]]:
        out = [("advertiser_id", _adv(self.preset))]
        for name, value in self.template:
            out.append((name, override.pop(name, value.format(click=click_id, order=order_id))))
        return out + list(override.items()) + [(self.token_param, token)]  # overrides not in the template: added


CASES = [
    # https://<tracking-domain>/?nid=<NID>&transaction_id=<TID>&amount=<AMT>&order_id=<ID>&adv1=..&verification_token=..
    Case("everflow", (("nid", "123"), ("transaction_id", "{click}"), ("amount", "20.00"), ("order_id", "{order}"),
                      ("adv1", "blue")), "verification_token", "purchase", "approved", Decimal("20.00"), "USD"),
    # https://network.go2cloud.org/aff_lsr?offer_id=26&transaction_id=..&amount=..&security_token=..
    Case("tune", (("offer_id", "26"), ("transaction_id", "{click}"), ("amount", "15.50"), ("adv_sub", "{order}")),
         "security_token", "purchase", "approved", Decimal("15.50"), "USD",
         "status", ("pending", "approved", "rejected")),
    # https://offers-x.affise.com/postback?clickid={s1}&status=2 (+ action_id, sum, secure)
    Case("affise", (("clickid", "{click}"), ("status", "2"), ("action_id", "{order}"), ("sum", "30.00")),
         "secure", "purchase", "pending", Decimal("30.00"), "USD", "status", ("2", "1", "3")),
    # http://your_Voluum_domain.com/postback?cid=[subid]&payout=[commission]&txid=[transactionID]&et=install
    Case("voluum", (("cid", "{click}"), ("payout", "2.40"), ("txid", "{order}"), ("currency", "EUR"),
                    ("et", "install")), "token", "install", "approved", Decimal("2.40"), "EUR"),
    # https://my.postback.com/postback?clickid={sub}&type=Upsell (+ sum, rdtk_event_id, status)
    Case("redtrack", (("clickid", "{click}"), ("type", "Upsell"), ("sum", "9.99"), ("rdtk_event_id", "{order}"),
                      ("status", "Approved")), "token", "custom:upsell", "approved", Decimal("9.99"), "USD",
         "status", ("Pending", "Approved", "Declined")),
    # https://example.com/key/postback?subid={subid}&status=lead&payout=10&currency=EUR (+ tid)
    Case("keitaro", (("subid", "{click}"), ("status", "lead"), ("payout", "10"), ("tid", "{order}")),
         "token", "purchase", "pending", Decimal("10"), "EUR", "status", ("lead", "sale", "rejected")),
    # https://<tracker>/click.php?cnv_id={NETWORK_TOKEN}&payout={PAYOUT_TOKEN}&cnv_status={CONVERSION_STATUS}
    Case("binom", (("cnv_id", "{click}"), ("payout", "7.25"), ("cnv_status", "approve"), ("cnv_currency", "GBP")),
         "token", "purchase", "approved", Decimal("7.25"), "GBP", "cnv_status", ("hold", "approve", "reject")),
    # https://trk.clientdomain.com/p.ashx?a=1&t=123456&r=25566&f=pb&e=123&p=61.00
    Case("cake", (("a", "1"), ("t", "{order}"), ("r", "{click}"), ("f", "pb"), ("e", "123"), ("p", "61.00")),
         "token", "purchase", "approved", Decimal("61.00"), "USD"),
]
BY_PRESET = {c.preset: c for c in CASES}


def _order(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _click(pipe: Pipeline, preset: str, affiliate: str = "aff-presets") -> str:
    resp = http_get(f"{pipe.url}/click?offer_id=offer-{preset}&affiliate_id={affiliate}&sub1={preset}")
    assert resp.status == 200, (resp.status, resp.body)
    return resp.json()["click_id"]


def _post(pipe: Pipeline, params: list[tuple[str, str]]) -> str:
    resp = pipe.get("/postback?" + urllib.parse.urlencode(params))
    assert resp.status == 202, (resp.status, resp.body, params)
    return resp.json()["receipt_id"]


def _outcomes(pipe: Pipeline, receipts: list[str]) -> dict[str, dict[str, Any]]:
    """receipt -> its one outcome row, once all have one (bounded)."""
    def complete() -> dict[str, dict[str, Any]] | None:
        rows = pipe.query("SELECT receipt_id, outcome, reason, conversion_id FROM postback_outcomes FINAL "
                          "WHERE receipt_id IN {r:Array(String)}", {"r": receipts})
        found: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            found.setdefault(row["receipt_id"], []).append(row)
        assert all(len(v) == 1 for v in found.values()), f"a receipt with several outcomes: {found}"
        return {r: v[0] for r, v in found.items()} if set(found) == set(receipts) else None

    return eventually(complete, WAIT_S, f"outcomes of {len(receipts)} receipts\n{pipe.logs()}")


def _conversion(pipe: Pipeline, receipt: str) -> dict[str, Any]:
    rows = pipe.query("SELECT * FROM conversions FINAL WHERE conversion_id IN "
                      "(SELECT conversion_id FROM postback_outcomes FINAL WHERE receipt_id = {r:String})",
                      {"r": receipt})
    assert len(rows) == 1, rows
    return rows[0]


@pytest.fixture(scope="module")
def pipe(kafka: KafkaService, clickhouse: ClickHouseService,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with running_pipeline(tmp_path_factory.mktemp("presets"), kafka.bootstrap_servers, clickhouse.url,
                          partners_toml=PARTNERS) as pipeline:
        yield pipeline


@pytest.mark.parametrize("case", CASES, ids=[c.preset for c in CASES])
def test_documented_postback_retry_forgery_and_unknown_click(pipe: Pipeline, case: Case) -> None:
    click_id = _click(pipe, case.preset)
    order_id = _order(case.preset)
    valid = case.params(click_id, order_id)
    first = _post(pipe, valid)
    retry = _post(pipe, valid)  # the very same request again
    forged = _post(pipe, case.params(click_id, _order(case.preset), token="forged-" + TOKEN))
    lost_order = _order(case.preset)
    unknown_click = _post(pipe, case.params("01ZZZZZZZZZZZZZZZZZZZZZZZZ", lost_order))

    outcomes = _outcomes(pipe, [first, retry, forged, unknown_click])
    assert outcomes[first]["outcome"] == "accepted", outcomes[first]
    assert (outcomes[retry]["outcome"], outcomes[retry]["reason"]) in {("duplicate", "retry"),
                                                                        ("duplicate", "order_repeat"),
                                                                        ("duplicate", "one_time_event_repeat")}
    assert (outcomes[forged]["outcome"], outcomes[forged]["reason"]) == ("rejected", "bad_signature")
    assert outcomes[unknown_click]["outcome"] == "accepted"

    c = _conversion(pipe, first)
    assert (c["advertiser_id"], c["offer_id"], c["affiliate_id"], c["sub1"]) == \
        (_adv(case.preset), f"offer-{case.preset}", "aff-presets", case.preset)
    assert (c["click_id"], c["attribution"], c["event"], c["status"]) == \
        (click_id, "attributed", case.event, case.status)
    assert (c["amount"], c["currency"], c["version"]) == (case.amount, case.currency, 1)
    if case.preset != "binom":  # binom sends no order id: the conversion is the click's
        assert c["order_id"] == order_id
    lost = eventually(lambda: (lambda c: c if c["attribution"] != "pending" else None)(
        _conversion(pipe, unknown_click)), NO_CLICK_WAIT_S, "the unknown click's conversion")
    assert lost["attribution"] == "no_click" and not lost["attributed"], lost


@pytest.mark.parametrize("case", [c for c in CASES if c.chain], ids=[c.preset for c in CASES if c.chain])
def test_a_status_chain_sent_back_to_back_ends_in_its_last_status(pipe: Pipeline, case: Case) -> None:
    """Issue 11, problem 4: 8 orders, each update sent after the previous 202; every order ends rejected."""
    assert case.status_param is not None
    orders = []
    receipts = []
    for _ in range(8):
        click_id, order_id = _click(pipe, case.preset), _order(case.preset)
        orders.append(order_id)
        for status in case.chain:
            receipts.append(_post(pipe, case.params(click_id, order_id, **{case.status_param: status})))
    outcomes = _outcomes(pipe, receipts)
    assert [o for o in outcomes.values() if o["outcome"] != "accepted"] == []
    conversions = {outcomes[r]["conversion_id"] for r in receipts}
    assert len(conversions) == len(orders), "each order's updates must update one conversion"
    rows = pipe.query("SELECT conversion_id, status, version FROM conversions FINAL "
                      "WHERE conversion_id IN {c:Array(String)}", {"c": sorted(conversions)})
    assert len(rows) == len(orders)
    assert all((r["status"], r["version"]) == ("rejected", len(case.chain)) for r in rows), rows
    net = pipe.query("SELECT count() AS n FROM v_conversions_net WHERE conversion_id IN {c:Array(String)}",
                     {"c": sorted(conversions)})
    assert net[0]["n"] == 0, "rejected orders must not count as revenue"


def test_keitaro_regression_twenty_orders_lead_sale_rejected(pipe: Pipeline) -> None:
    """The reproduction from issue 11: Keitaro-shaped lead, sale, rejected for 20 orders back to back."""
    case = BY_PRESET["keitaro"]
    receipts: dict[str, list[str]] = {}
    for _ in range(20):
        click_id, order_id = _click(pipe, "keitaro"), _order("k20")
        receipts[order_id] = [_post(pipe, case.params(click_id, order_id, status=s))
                              for s in ("lead", "sale", "rejected")]
    _outcomes(pipe, [r for rs in receipts.values() for r in rs])
    rows = pipe.query("SELECT order_id, status FROM conversions FINAL WHERE order_id IN {o:Array(String)}",
                      {"o": list(receipts)})
    assert sorted(r["order_id"] for r in rows) == sorted(receipts)
    wrong = [r for r in rows if r["status"] != "rejected"]
    assert not wrong, f"{len(wrong)} of 20 orders did not end rejected: {wrong}"
    net = pipe.query("SELECT count() AS n FROM v_conversions_net WHERE order_id IN {o:Array(String)}",
                     {"o": list(receipts)})
    assert net[0]["n"] == 0


def test_updates_processed_against_their_event_time_keep_the_latest_status(pipe: Pipeline) -> None:
    """The later update (by the advertiser's event time) is sent first: the earlier one must not win."""
    case = BY_PRESET["keitaro"]
    click_id, order_id = _click(pipe, "keitaro"), _order("late")
    now = int(time.time())
    rejected = _post(pipe, case.params(click_id, order_id, status="rejected") + [("event_time", str(now))])
    sale = _post(pipe, case.params(click_id, order_id, status="sale") + [("event_time", str(now - 60))])
    outcomes = _outcomes(pipe, [rejected, sale])
    assert outcomes[rejected]["outcome"] == "accepted"
    assert (outcomes[sale]["outcome"], outcomes[sale]["reason"]) == ("duplicate", "superseded")
    rows = pipe.query("SELECT status, version FROM conversions FINAL WHERE order_id = {o:String}", {"o": order_id})
    assert rows == [{"status": "rejected", "version": 1}]


def test_an_aliased_event_passes_the_door_and_a_missing_one_is_refused(pipe: Pipeline) -> None:
    """Issue 11, problem 1: Voluum's `et` is the event; without it the preset's default event applies,
    while an advertiser-less request with no event is still refused with a typed 400."""
    case = BY_PRESET["voluum"]
    click_id = _click(pipe, "voluum")
    receipt = _post(pipe, case.params(click_id, _order("et")))
    assert _outcomes(pipe, [receipt])[receipt]["outcome"] == "accepted"
    resp = http_get(f"{pipe.url}/postback?advertiser_id=nobody&et=install&cid={click_id}")
    assert resp.status == 400
    assert resp.json()["errors"] == [{"field": "event", "reason": "missing"}]
    resp = http_get(f"{pipe.url}/postback?advertiser_id=p-voluum&et=install&event=purchase&cid={click_id}")
    assert resp.status == 400
    assert resp.json()["errors"] == [{"field": "event", "reason": "duplicate"}]


def test_an_aliased_token_is_seen_and_a_missing_one_is_missing(pipe: Pipeline) -> None:
    """Issue 11, problem 2: Affise's `secure` is the token."""
    case = BY_PRESET["affise"]
    click_id = _click(pipe, "affise")
    good = _post(pipe, case.params(click_id, _order("sec")))
    missing = _post(pipe, [p for p in case.params(click_id, _order("sec")) if p[0] != "secure"])
    outcomes = _outcomes(pipe, [good, missing])
    assert outcomes[good]["outcome"] == "accepted"
    assert (outcomes[missing]["outcome"], outcomes[missing]["reason"]) == ("rejected", "missing_signature")


def test_a_stale_signature_under_aliased_names_is_stale(pipe: Pipeline) -> None:
    from processors.signing import canonical_query

    click_id = _click(pipe, "signed")

    def signed(ts: int) -> list[tuple[str, str]]:
        params = [("advertiser_id", "p-signed"), ("cid", click_id), ("txid", _order("sig")), ("payout", "5.00"),
                  ("currency", "USD"), ("timestamp", str(ts))]
        digest = hmac.new(HMAC_SECRET.encode(), canonical_query(params).encode(), hashlib.sha256).hexdigest()
        return params + [("signature", digest)]

    fresh = _post(pipe, signed(int(time.time())))
    stale = _post(pipe, signed(int(time.time()) - 3600))
    outcomes = _outcomes(pipe, [fresh, stale])
    assert outcomes[fresh]["outcome"] == "accepted", outcomes
    assert (outcomes[stale]["outcome"], outcomes[stale]["reason"]) == ("rejected", "stale_timestamp")


def test_every_202_has_exactly_one_outcome(pipe: Pipeline) -> None:
    """Runs last in this module: every 202 the tests above received has one outcome row."""
    receipts = list(dict.fromkeys(pipe.receipts_202))
    assert len(receipts) == len(pipe.receipts_202) > 100
    assert set(_outcomes(pipe, receipts)) == set(receipts)
