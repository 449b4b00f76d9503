"""The partner-visible flow through `postback run`, over HTTP only: click, postback, refund, retry, forgery.

Inputs go in only as HTTP requests (GET /click, GET /postback), answers come back through
GET /postback/receipts/{id}; ClickHouse is read the way an analyst reads it (FINAL, views).
"""

from __future__ import annotations

import urllib.parse
import uuid
from decimal import Decimal
from typing import Any

import pytest

from .conftest import (ADVERTISER, OFFER, SECRET, TOKEN, Pipeline, eventually, http_get, postback_params,
                       signed_query)

WAIT_S = 90.0


def _order(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _postback(pipe: Pipeline, query: str) -> str:
    resp = pipe.get("/postback?" + query)
    assert resp.status == 202, (resp.status, resp.body)
    body = resp.json()
    assert body["status"] == "accepted"
    return body["receipt_id"]


def _receipt(pipe: Pipeline, receipt_id: str) -> dict[str, Any]:
    """GET /postback/receipts/{id} once it is decided (pending/unknown/503 are 'not yet')."""
    def decided() -> dict[str, Any] | None:
        resp = http_get(f"{pipe.url}/postback/receipts/{receipt_id}")
        if resp.status != 200:
            return None
        body = resp.json()
        return body if body["status"] in ("accepted", "duplicate", "rejected") else None

    return eventually(decided, WAIT_S, f"receipt {receipt_id} to be decided\n{pipe.logs()}")


def _conversions(pipe: Pipeline, order_id: str) -> list[dict[str, Any]]:
    return pipe.query("SELECT conversion_id, version, receipt_id, advertiser_id, offer_id, affiliate_id, campaign_id, "
                      "click_id, sub1, sub2, sub3, event, status, order_id, amount, currency, sign, attributed, "
                      "attribution FROM conversions FINAL WHERE order_id = {o:String} ORDER BY event",
                      {"o": order_id})


@pytest.fixture(scope="module")
def attributed_order(pipeline: Pipeline) -> dict[str, Any]:
    """A click through GET /click, then its advertiser's signed purchase postback, until converted."""
    resp = http_get(f"{pipeline.url}/click?offer_id={OFFER}&affiliate_id=aff-42&campaign_id=camp-9"
                    "&sub1=s1-alpha&sub2=s2-beta")
    assert resp.status == 302, (resp.status, resp.body)
    landing = urllib.parse.urlsplit(resp.headers["location"])
    query = urllib.parse.parse_qs(landing.query)
    assert landing.netloc == "shop.example" and query["aff"] == ["aff-42"]
    click_id = query["cid"][0]
    order_id = _order("buy")
    receipt = _postback(pipeline, signed_query(postback_params(order_id, amount="49.90", click_id=click_id)))
    rows = eventually(lambda: _conversions(pipeline, order_id), WAIT_S,
                      f"the conversion of {order_id}\n{pipeline.logs()}")
    return {"click_id": click_id, "order_id": order_id, "receipt_id": receipt, "conversion": rows[0]}


def test_click_then_signed_postback_is_an_attributed_conversion(pipeline: Pipeline,
                                                                attributed_order: dict[str, Any]) -> None:
    rows = _conversions(pipeline, attributed_order["order_id"])
    assert len(rows) == 1, rows
    c = rows[0]
    assert c["receipt_id"] == attributed_order["receipt_id"]
    assert c["click_id"] == attributed_order["click_id"]
    assert (c["advertiser_id"], c["offer_id"], c["event"], c["status"]) == (ADVERTISER, OFFER, "purchase", "approved")
    assert (c["affiliate_id"], c["campaign_id"], c["sub1"], c["sub2"], c["sub3"]) == \
        ("aff-42", "camp-9", "s1-alpha", "s2-beta", None)
    assert c["attributed"] is True or c["attributed"] == 1
    assert c["attribution"] == "attributed"
    assert (c["amount"], c["currency"], c["sign"], c["version"]) == (Decimal("49.90"), "USD", 1, 1)

    answer = _receipt(pipeline, attributed_order["receipt_id"])
    assert answer["status"] == "accepted", answer
    assert answer["conversion_id"] == c["conversion_id"]
    assert (answer["advertiser_id"], answer["event"]) == (ADVERTISER, "purchase")


def test_a_refund_nets_the_order_to_zero(pipeline: Pipeline, attributed_order: dict[str, Any]) -> None:
    order_id = attributed_order["order_id"]
    receipt = _postback(pipeline, signed_query(postback_params(order_id, event="refund", amount="49.90",
                                                               click_id=attributed_order["click_id"])))
    assert _receipt(pipeline, receipt)["status"] == "accepted"

    def net() -> list[dict[str, Any]] | None:
        rows = pipeline.query("SELECT count() AS n, countIf(is_reversal) AS reversals, sum(signed_amount) AS net, "
                              "sumIf(amount, sign > 0) AS gross FROM v_conversions_net WHERE order_id = {o:String}",
                              {"o": order_id})
        return rows if rows[0]["n"] == 2 else None

    row = eventually(net, WAIT_S, f"the refund of {order_id} in v_conversions_net")[0]
    assert row["reversals"] == 1
    assert row["gross"] == Decimal("49.90")
    assert row["net"] == Decimal("0")
    refund = [c for c in _conversions(pipeline, order_id) if c["event"] == "refund"]
    assert len(refund) == 1 and refund[0]["sign"] == -1 and refund[0]["receipt_id"] == receipt
    assert refund[0]["conversion_id"] != attributed_order["conversion"]["conversion_id"]


def test_an_exact_retry_is_one_conversion_and_a_duplicate(pipeline: Pipeline) -> None:
    order_id = _order("retry")
    query = signed_query(postback_params(order_id, amount="12.00"))
    first, second = _postback(pipeline, query), _postback(pipeline, query)  # the very same signed request
    assert first != second, "every request gets its own receipt id"

    answers = {r: _receipt(pipeline, r) for r in (first, second)}
    by_status = {a["status"]: r for r, a in answers.items()}
    assert set(by_status) == {"accepted", "duplicate"}, answers
    kept, dropped = by_status["accepted"], by_status["duplicate"]
    assert answers[dropped]["reason"] == "retry"
    assert answers[dropped]["first_receipt_id"] == kept

    rows = _conversions(pipeline, order_id)
    assert len(rows) == 1, rows
    assert rows[0]["receipt_id"] == kept
    assert rows[0]["conversion_id"] == answers[kept]["conversion_id"]


@pytest.mark.parametrize("forgery", ["tampered_amount", "wrong_secret"])
def test_a_forged_signature_is_rejected(pipeline: Pipeline, forgery: str) -> None:
    order_id = _order("forged")
    if forgery == "tampered_amount":  # signed for 1.00, sent for 999.00
        query = signed_query(postback_params(order_id, amount="1.00")).replace("amount=1.00", "amount=999.00")
    else:
        query = signed_query(postback_params(order_id, amount="5.00"), secret="not-the-secret-" + SECRET[::-1])
    receipt = _postback(pipeline, query)  # 202 means recorded, not accepted: verification comes later

    answer = _receipt(pipeline, receipt)
    assert answer["status"] == "rejected", answer
    assert answer["reason"] == "bad_signature"
    assert answer["detail"]
    outcome = pipeline.query("SELECT outcome, reason FROM postback_outcomes FINAL WHERE receipt_id = {r:String}",
                             {"r": receipt})
    assert outcome == [{"outcome": "rejected", "reason": "bad_signature"}]
    assert _conversions(pipeline, order_id) == []


def test_a_legacy_token_postback_is_accepted(pipeline: Pipeline) -> None:
    order_id = _order("token")
    query = urllib.parse.urlencode(postback_params(order_id, amount="3.00") + [("token", TOKEN)])
    receipt = _postback(pipeline, query)
    answer = _receipt(pipeline, receipt)
    assert answer["status"] == "accepted", answer
    assert len(_conversions(pipeline, order_id)) == 1


def test_every_202_has_exactly_one_outcome_row_and_its_receipt_answer(pipeline: Pipeline) -> None:
    """Runs last in this module: covers every 202 the tests above received."""
    receipts = set(pipeline.receipts_202)
    assert len(receipts) == len(pipeline.receipts_202) >= 7

    def complete() -> dict[str, list[dict[str, Any]]] | None:
        outcomes = pipeline.outcomes()
        return outcomes if receipts <= set(outcomes) else None

    outcomes = eventually(complete, WAIT_S, "an outcome row for every 202")
    assert set(outcomes) == receipts, "an outcome row for a receipt nobody got a 202 for"
    assert all(len(rows) == 1 for rows in outcomes.values()), outcomes
    # Not FINAL: physical rows may repeat before a merge, but never with a different outcome.
    raw = pipeline.query("SELECT receipt_id, uniqExact(outcome) AS n FROM postback_outcomes GROUP BY receipt_id")
    assert all(r["n"] == 1 for r in raw)
    for receipt, rows in outcomes.items():
        answer = _receipt(pipeline, receipt)
        assert answer["status"] == rows[0]["outcome"], (receipt, answer, rows)
        assert (answer["reason"] or "") == rows[0]["reason"]
    assert http_get(f"{pipeline.url}/postback/receipts/01ARZ3NDEKTSV4RRFFQ69G5FAV").status == 404
