"""The pure parts of `postback demo`: the demo partner file, the traffic plan, request signing, the summary.

The end-to-end run against a live pipeline is tested elsewhere; here every postback of a
plan goes through the real ingester parsing and the real verify/dedupe stage functions,
so "the plan expects X" is checked against what the processors actually decide.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from ingest.app import SIGNATURE_HEADERS
from ingest.validation import check_postback, click_from_params, parse_bulk_clicks, parse_json_object, \
    parse_urlencoded
from app import demo
from app.demo import plan as demo_plan
from app.demo import report as demo_report
from app.demo import send as demo_send
from app.demo.plan import ClickStep, PostbackStep
from app.demo.report import DemoReport, Quantiles, RevenueRow
from app.demo.send import ProgressBar, WireRequest
from postback.config import Settings
from postback.partners import load_partner_config
from processors import stages
from processors.normalize import normalize
from processors.signing import AuthFailed, AuthOk, authenticate

CONFIG = load_partner_config(demo.DEMO_PARTNERS)
RUN_ID = "01K2ZC4D3E5F6G7H8J9K0MNPQR"
CLICK_ID = "01K2ZC4D3EABCDEFGHJKMNPQRS"
TS = 1_767_225_600


def _recorded(req: WireRequest, receipt: str, received_at_ms: int) -> dict:
    """The RawPostback the ingester would record for `req` (raising if it would answer 400)."""
    params = parse_urlencoded(req.raw_query)
    headers = dict(req.headers)
    content_type = None
    if req.method == "POST":
        content_type = headers["Content-Type"]
        params += parse_json_object(req.body)
    check_postback(params)
    return {"receipt_id": receipt, "received_at_ms": received_at_ms, "remote_ip": "127.0.0.1",
            "method": req.method, "path": req.path, "content_type": content_type,
            "params": [{"key": k, "value": v} for k, v in params], "body": req.body,
            "headers": [{"key": h, "value": headers[h]} for h in SIGNATURE_HEADERS if h in headers],
            "ingester_id": "test"}


# --------------------------------------------------------------------------- partner file


def test_demo_partner_file_loads_and_suits_a_loopback_demo() -> None:
    assert set(CONFIG.advertisers) == {"shopco", "streamly", "gamehub"}
    assert len(CONFIG.offers) == 5
    assert CONFIG.bulk_import_enabled
    assert all(not adv.allow_ips for adv in CONFIG.advertisers.values())  # 127.0.0.1 must be allowed
    assert len(CONFIG.advertisers["shopco"].secrets) == 2  # a key rotation in progress
    streamly = CONFIG.advertisers["streamly"]
    assert streamly.allows_hmac and streamly.allows_token and streamly.aliases and streamly.status_map
    landings = [o.landing_url for o in CONFIG.offers.values()]
    assert any(u is None for u in landings)
    assert all("{click_id}" in u for u in landings if u)
    text = demo.DEMO_PARTNERS.read_text()
    assert "demo-only" in text.lower() and "DEMO-ONLY SECRETS" in text


def test_partner_file_prefers_postback_config(tmp_path: Path) -> None:
    assert demo.partner_file(Settings.from_env({})) == demo.DEMO_PARTNERS
    own = tmp_path / "p.toml"
    assert demo.partner_file(Settings.from_env({"POSTBACK_CONFIG": str(own)})) == own


# --------------------------------------------------------------------------- the plan


def test_plan_is_deterministic_for_a_seed() -> None:
    a = demo_plan.build_plan(CONFIG, 200, 42, RUN_ID)
    assert a == demo_plan.build_plan(CONFIG, 200, 42, RUN_ID)
    assert a != demo_plan.build_plan(CONFIG, 200, 43, RUN_ID)
    assert len(a.journeys) == 200 and a.requests == sum(len(j.steps) for j in a.journeys)


def test_order_ids_are_unique_per_run() -> None:
    first = demo_plan.build_plan(CONFIG, 300, 7, RUN_ID)
    again = demo_plan.build_plan(CONFIG, 300, 7, "01K2ZC4D3E5F6G7H8J9K0ZZZZZ")
    orders = {s.order_id for _, s in first.postbacks() if s.order_id}
    assert orders and not orders & {s.order_id for _, s in again.postbacks() if s.order_id}
    originals = [s.order_id for _, s in first.postbacks()
                 if s.order_id and s.role == "original" and s.event not in ("refund", "renewal")]
    assert len(originals) == len(set(originals))


@pytest.mark.parametrize("seed", [1, 2])
def test_mix_percentages_roughly_hold(seed: int) -> None:
    plan = demo_plan.build_plan(CONFIG, 6000, seed, RUN_ID)
    mix = plan.mix()
    assert 0.035 <= mix["retry"] <= 0.065
    assert 0.02 <= mix["resign"] <= 0.045
    assert 0.02 <= mix["bad_signature"] <= 0.045
    assert 0.035 <= mix["no_click_id"] <= 0.065
    assert 0.02 <= mix["late_click"] <= 0.045
    assert 0.3 <= mix["json"] <= 0.6 and mix["token"] > 0.02  # both signing styles, some legacy tokens
    steps = [s for _, s in plan.postbacks()]
    events = Counter(s.event for s in steps)
    for event in ("purchase", "lead", "signup", "trial_start", "renewal", "refund"):
        assert events[event] > 0, event
    assert {s.currency for s in steps if s.currency} >= {"USD", "EUR", "GBP"}
    assert any(s.role == "status_update" and s.status == "approved" for s in steps)
    assert all(dict(s.params).get("period") for s in steps if s.event == "renewal")
    # clicks: one per journey, redirected or (late) bulk-imported after the first postback
    for journey in plan.journeys:
        clicks = [i for i, s in enumerate(journey.steps) if isinstance(s, ClickStep)]
        assert len(clicks) == 1
        if journey.late_click_id:
            assert journey.steps[clicks[0]].mode == "bulk" and clicks[0] > 0
        else:
            assert clicks == [0] and journey.steps[0].mode == "redirect"


def test_status_updates_follow_their_pending_order_in_the_same_journey() -> None:
    plan = demo_plan.build_plan(CONFIG, 2000, 3, RUN_ID)
    seen = 0
    for journey in plan.journeys:
        steps = journey.postbacks
        for i, step in enumerate(steps):
            if step.role == "status_update":
                seen += 1
                assert step.with_click_id  # same raw partition as the pending one: processed in order
                assert any(p.order_id == step.order_id and p.status == "pending" for p in steps[:i])
    assert seen > 0


def test_every_postback_is_signed_as_the_processors_verify_it() -> None:
    plan = demo_plan.build_plan(CONFIG, 1500, 11, RUN_ID)
    checked = Counter()
    for _journey, step in plan.postbacks():
        req = demo_send.render_postback(step, CONFIG, CLICK_ID if step.with_click_id else None, TS)
        raw = _recorded(req, "R", TS * 1000 + 400)
        params = [(kv["key"], kv["value"]) for kv in raw["params"]]
        adv = CONFIG.advertisers[step.advertiser_id]
        auth = authenticate(adv, params, {kv["key"]: kv["value"] for kv in raw["headers"]}, raw["body"],
                            raw["content_type"], raw["remote_ip"], raw["received_at_ms"])
        if step.bad:
            assert isinstance(auth, AuthFailed) and auth.reason == "bad_signature", (step, auth)
            checked["bad"] += 1
            continue
        assert isinstance(auth, AuthOk), (step, auth)
        assert auth.mode == ("token" if step.transport == "token" else "hmac")
        if step.transport != "token":
            assert auth.key_id == step.key_id or step.all_keys
        n = normalize(params, adv)
        assert (n.event, n.status, n.order_id) == (step.event, step.status, step.order_id)
        assert n.click_id == (CLICK_ID if step.with_click_id else None)
        assert (n.amount, n.currency) == ((Decimal(step.amount), step.currency) if step.amount else (None, None))
        assert (req.method == "POST") == (step.transport == "json")
        checked[step.transport] += 1
    assert checked["bad"] and checked["query"] and checked["json"] and checked["token"]


def test_planned_outcomes_are_what_verify_and_dedupe_decide() -> None:
    """Replay every journey through the real stage functions: each postback gets its planned outcome."""
    plan = demo_plan.build_plan(CONFIG, 1500, 5, RUN_ID)
    table: dict = {}
    now_ms = TS * 1000
    tally = Counter()
    for journey in plan.journeys:
        click_id = journey.late_click_id or f"C{journey.index:05d}"
        sent: dict[int, WireRequest] = {}
        for index, step in enumerate(journey.steps):
            now_ms += int(step.delay_s * 1000) + 1
            if not isinstance(step, PostbackStep):
                continue
            req = sent[step.resend_of] if step.resend_of is not None else \
                demo_send.render_postback(step, CONFIG, click_id, now_ms // 1000)
            sent[index] = req
            receipt = f"R{journey.index}-{index}"
            out = stages.verify(_recorded(req, receipt, now_ms), CONFIG, now_ms)
            if out.kind == "dedupe":
                out = stages.dedupe(out.record, table, 0, now_ms)
            outcome = {"rejection": "rejected", "duplicate": "duplicate"}.get(out.kind, "accepted")
            reason = out.record["reason"] if out.kind in ("rejection", "duplicate") else ""
            assert (outcome, reason) == (step.expect, step.expect_reason), (journey, step, out)
            tally[(outcome, reason)] += 1
    assert tally == plan.expected_outcomes()
    assert set(tally) == {("accepted", ""), ("duplicate", "retry"), ("duplicate", "order_repeat"),
                          ("rejected", "bad_signature")}


def test_distinct_postbacks_are_distinct_requests_even_when_signed_in_the_same_second() -> None:
    """Only planned exact retries may share a replay key: anything else would be dropped as a `retry`."""
    plan = demo_plan.build_plan(CONFIG, 3000, 13, RUN_ID)
    keys: Counter = Counter()
    for _journey, step in plan.postbacks():
        if step.role in ("retry", "resign", "bad_signature"):  # same content by design (resign: later ts)
            continue
        req = demo_send.render_postback(step, CONFIG, CLICK_ID if step.with_click_id else None, TS)
        out = stages.verify(_recorded(req, "R", TS * 1000), CONFIG, TS * 1000)
        keys[out.record["replay_key"]] += 1
    assert keys and max(keys.values()) == 1


# --------------------------------------------------------------------------- requests


def test_click_requests_are_valid_and_the_click_id_is_found_in_the_redirect() -> None:
    plan = demo_plan.build_plan(CONFIG, 300, 9, RUN_ID)
    for journey in plan.journeys[:50]:
        click = click_from_params(parse_urlencoded(demo_send.click_request(journey).raw_query))
        assert (click.offer_id, click.affiliate_id) == (journey.offer_id, journey.affiliate_id)
    for offer in CONFIG.offers.values():
        if offer.landing_url:
            location = offer.landing_for(CLICK_ID, "aff-coupons", "coupons-spring", ("home page", "ios"))
            assert demo_send.click_id_from_location(location, offer) == CLICK_ID
    assert demo_send.click_id_from_location(f"https://elsewhere.example/?x={CLICK_ID}", None) == CLICK_ID
    assert demo_send.click_id_from_location("https://elsewhere.example/", None) is None


def test_late_clicks_are_bulk_imported_with_our_click_id() -> None:
    plan = demo_plan.build_plan(CONFIG, 1000, 4, RUN_ID)
    late = [j for j in plan.journeys if j.late_click_id]
    assert late
    for journey in late:
        assert journey.late_click_id and len(journey.late_click_id) == 26
        req = demo_send.bulk_click_request(journey, CONFIG.ingest_bulk_token or "", TS * 1000 - 60_000)
        assert dict(req.headers)["Authorization"] == f"Bearer {CONFIG.ingest_bulk_token}"
        accepted, errors = parse_bulk_clicks(req.body, "application/json")
        assert not errors and accepted[0][1].click_id == journey.late_click_id
        assert accepted[0][1].clicked_at_ms == TS * 1000 - 60_000


def test_exact_retry_resends_the_same_bytes() -> None:
    plan = demo_plan.build_plan(CONFIG, 1000, 8, RUN_ID)
    journey, step = next((j, s) for j, s in plan.postbacks() if s.role == "retry")
    original = journey.steps[step.resend_of]
    assert isinstance(original, PostbackStep) and original.role == "original"
    assert (original.params, original.transport) == (step.params, step.transport)


# --------------------------------------------------------------------------- summary


def _report(**overrides: object) -> DemoReport:
    base = dict(
        receipts_accepted=10, receipts_with_outcome=10,
        outcomes=(("accepted", "", 7), ("duplicate", "order_repeat", 1), ("duplicate", "retry", 1),
                  ("rejected", "bad_signature", 1)),
        expected=(("accepted", "", 7), ("duplicate", "order_repeat", 1), ("duplicate", "retry", 1),
                  ("rejected", "bad_signature", 1)),
        conversions=(("approved", "attributed", 5), ("approved", "no_click_id", 1), ("pending", "attributed", 1)),
        revenue=(
            RevenueRow("aff-coupons", "shopco-spring", "USD", True, 3, 1, Decimal("300.00"), Decimal("250.50")),
            RevenueRow("aff-coupons", "streamly-trial", "", True, 1, 0, Decimal(0), Decimal(0)),
            RevenueRow("aff-search", "shopco-spring", "EUR", True, 1, 0, Decimal("1200.00"), Decimal("1200.00")),
            RevenueRow("", "", "USD", False, 1, 0, Decimal("19.99"), Decimal("19.99")),
        ),
        decision_latency_ms=Quantiles(10, 120.0, 1850.0, 2100.0),
        sink_latency_ms=Quantiles(6, 900.0, 1400.0, 1500.0),
        row_latency_ms=Quantiles(6, 1100.0, 3000.0, 3100.0),
        clicks_sent=8, clicks_recorded=8, requests=18, elapsed_s=2.0, timeout_s=120.0,
        answers=(("GET /click 302", 8), ("GET /postback 202", 6), ("POST /postback 202", 4)),
    )
    base.update(overrides)
    return DemoReport(**base)  # type: ignore[arg-type]


def test_format_report_shows_revenue_rates_reasons_and_latency() -> None:
    text = demo_report.format_report(_report())
    assert "18 requests in 2.0s (9/s); clicks issued: 8, in ClickHouse: 8" in text
    assert "postbacks accepted by the ingester (202): 10; with an outcome in ClickHouse: 10" in text
    assert "HTTP answers: GET /click 302 x8, GET /postback 202 x6, POST /postback 202 x4" in text
    lines = text.splitlines()
    table = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  aff-")}
    assert lines[lines.index("== Net revenue by affiliate (approved conversions; refunds subtracted)") + 1].split() \
        == ["affiliate", "conversions", "refunds", "net", "EUR", "net", "USD"]
    assert table["aff-coupons"] == ["4", "1", "-", "250.50"]
    assert table["aff-search"] == ["1", "0", "1,200.00", "-"]
    assert next(line for line in lines if "(no click)" in line).split()[2:] == ["1", "0", "-", "19.99"]
    assert next(line for line in lines if "= all affiliates" in line).split()[3:] == \
        ["6", "1", "1,200.00", "270.49"]
    offers = {line.split()[0]: line.split()[1:] for line in lines if line.startswith(("  shopco", "  streamly"))}
    assert offers == {"shopco-spring": ["4", "1", "1,200.00", "250.50"], "streamly-trial": ["1", "0", "-", "-"]}
    assert "attributed to affiliates: 1,200.00 EUR, 250.50 USD" in text
    assert "match rate: 85.7% of 7 conversions" in text and "(100.0% of those that named a click)" in text
    assert "no_click_id: 1" in text
    assert "not counted as revenue: 1 pending, 0 rejected" in text
    assert "dedupe rate: 20.0% (2 duplicates: order_repeat 1, retry 1)" in text
    assert "rejection rate: 10.0% (1 rejected)" in text
    assert any(line.split() == ["1", "bad_signature"] for line in lines)
    assert "differs" not in text
    assert "p50 120 ms, p99 1,850 ms, max 2,100 ms (n=10)" in text
    assert "p50 900 ms, p99 1,400 ms" in text and "p50 1,100 ms, p99 3,000 ms" in text


def test_format_report_flags_differences_and_missing_outcomes() -> None:
    text = demo_report.format_report(_report(receipts_with_outcome=9,
                                      outcomes=(("accepted", "", 8), ("rejected", "bad_signature", 1)),
                                      decision_latency_ms=None, revenue=()))
    assert "(1 MISSING)" in text and "<- differs" in text and "(no approved conversions)" in text
    assert "receipt -> outcome decided (postback_outcomes.latency_ms): n/a" in text


def test_verdict() -> None:
    ok, message = demo_report.verdict(_report())
    assert ok and message.startswith("OK") and "250.50 USD" in message
    ok, message = demo_report.verdict(_report(receipts_with_outcome=7))
    assert not ok and "3 of 10 accepted postbacks have no outcome" in message
    ok, message = demo_report.verdict(_report(receipts_accepted=0, receipts_with_outcome=0))
    assert not ok and "no 202" in message
    ok, message = demo_report.verdict(_report(revenue=(), outcomes=(("rejected", "bad_signature", 10),)))
    assert not ok and "no attributed revenue" in message and "different partner file" in message
    ok, message = demo_report.verdict(_report(outcomes=(("accepted", "", 2), ("rejected", "bad_signature", 8))))
    assert ok and "WARNING: 7 postbacks were rejected" in message and "different partner file" in message
    unattributed = (RevenueRow("", "", "USD", False, 1, 0, Decimal("5"), Decimal("5")),)
    assert not demo_report.verdict(_report(revenue=unattributed))[0]


def test_progress_bar_plain_and_tty() -> None:
    plain = io.StringIO()
    bar = ProgressBar("sending", 200, plain, tty=False)
    for done in range(201):
        bar.update(done)
    bar.finish()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in plain.getvalue()
    assert "100% 200/200" in lines[-1]
    tty = io.StringIO()
    bar = ProgressBar("sending", 5, tty, tty=True)
    for done in range(6):
        bar.update(done, force=True)
    bar.finish()
    assert tty.getvalue().count("\r") >= 6 and tty.getvalue().endswith("\n")


def test_cli_registers_demo_with_its_flags() -> None:
    from app.cli import build_parser

    args = build_parser().parse_args(["demo", "--url", "http://127.0.0.1:9", "--clicks", "5", "--rate", "10",
                                      "--database", "db", "--timeout", "3", "--seed", "4"])
    assert (args.url, args.clicks, args.rate, args.database, args.timeout, args.seed) == \
        ("http://127.0.0.1:9", 5, 10.0, "db", 3.0, 4)
    defaults = build_parser().parse_args(["demo"])
    assert (defaults.clicks, defaults.rate, defaults.timeout, defaults.seed) == (300, 200.0, 120.0, None)
