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
from app.demo.report import CapRow, DemoReport, HoldRow, PayoutCheck, PayoutRow, Quantiles, RevenueRow, \
    ScenarioRow
from app.demo.send import ProgressBar, WireRequest
from postback.config import Settings
from postback.fx import FxRates, parse_fx_csv, round_money
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


def test_demo_partner_file_pays_by_rule_with_a_cap_a_paused_affiliate_and_a_quality_rule() -> None:
    assert (CONFIG.account.reporting_currency, CONFIG.account.timezone) == ("USD", "Europe/Berlin")
    assert {a for a, _ in demo_plan.AFFILIATES} == set(CONFIG.affiliates)
    assert [a for a, aff in CONFIG.affiliates.items() if aff.status == "paused"] == ["aff-social"]
    kinds = {rule.kind for offer in CONFIG.offers.values() for rule in offer.payouts.values()}
    assert kinds == {"cpa", "revshare", "cpa_plus_revshare"}
    assert all(offer.payouts for offer in CONFIG.offers.values())
    assert CONFIG.offers["streamly-annual"].payouts["purchase"].tiers
    assert CONFIG.offers["gamehub-rpg"].caps.daily_conversions == 5
    assert CONFIG.offers["shopco-outlet"].quality.min_click_to_conversion_s == 2
    assert CONFIG.offers["shopco-spring"].clawback_days == 60
    assert CONFIG.affiliates["aff-coupons"].payouts["shopco-outlet"]["purchase"].amount == Decimal("7.50")


def test_demo_fx_rates_cover_every_currency_the_plan_sends() -> None:
    rates = parse_fx_csv(demo.DEMO_FX_RATES.read_text(), str(demo.DEMO_FX_RATES))
    plan = demo_plan.build_plan(CONFIG, 2000, 21, RUN_ID)
    sent = {s.currency for _, s in plan.postbacks() if s.currency}
    rules = {r.currency for o in CONFIG.offers.values() for r in o.payouts.values() if r.currency}
    foreign = (sent | rules) - {CONFIG.account.reporting_currency}
    assert foreign and foreign <= {r.currency for r in rates}
    assert min(r.date for r in rates) <= "2024-01-01"  # any demo date finds a rate
    assert demo.DEMO_FX_REPORTING == CONFIG.account.reporting_currency


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


# --------------------------------------------------------------------------- payouts


def test_plan_starts_with_the_payout_scenarios() -> None:
    plan = demo_plan.build_plan(CONFIG, 300, 42, RUN_ID)
    cap = CONFIG.offers["gamehub-rpg"].caps.daily_conversions
    scenarios = [j for j in plan.journeys if j.scenario]
    assert [j.scenario for j in scenarios] == \
        ["clawback", "too_fast", "paused"] + ["cap"] * (cap + demo_plan.CAP_EXCESS)
    assert plan.journeys[:len(scenarios)] == tuple(scenarios) and len(plan.journeys) == 300
    for journey in scenarios:
        assert journey.steps[0] == ClickStep("redirect")
        assert all(s.with_click_id and s.role == "original" and s.status == "approved" for s in journey.postbacks)
        status = "paused" if journey.scenario == "paused" else "active"
        assert CONFIG.affiliates[journey.affiliate_id].status == status
    by = {j.scenario: j for j in scenarios}
    buy, refund = by["clawback"].postbacks
    assert (buy.event, refund.event) == ("purchase", "refund") and buy.order_id == refund.order_id
    assert (refund.amount, refund.currency) == (buy.amount, buy.currency) and buy.currency != "USD"
    assert refund.delay_s >= 2.0  # the purchase's payout is decided before its refund arrives
    fast = by["too_fast"].postbacks[0]
    assert by["too_fast"].offer_id == "shopco-outlet" and fast.event_at_click and fast.delay_s == 0
    assert {j.offer_id for j in scenarios if j.scenario == "cap"} == {"gamehub-rpg"}
    # a plan too small for every scenario keeps the first ones
    assert [j.scenario for j in demo_plan.build_plan(CONFIG, 2, 42, RUN_ID).journeys] == ["clawback", "too_fast"]


def test_random_journeys_on_an_offer_with_a_minimum_wait_are_not_too_fast() -> None:
    plan = demo_plan.build_plan(CONFIG, 1500, 8, RUN_ID)
    waits = [j.steps[1].delay_s for j in plan.journeys
             if not j.scenario and j.offer_id == "shopco-outlet" and not j.late_click_id and len(j.steps) > 1]
    assert waits and min(waits) >= 2 + demo_plan.QUALITY_MARGIN_S[0]
    assert not any(s.event_at_click for j in plan.journeys if j.scenario != "too_fast" for s in j.postbacks)


def test_too_fast_postback_carries_the_click_time_as_event_time() -> None:
    plan = demo_plan.build_plan(CONFIG, 20, 42, RUN_ID)
    step = next(s for _, s in plan.postbacks() if s.event_at_click)
    req = demo_send.render_postback(step, CONFIG, CLICK_ID, TS, event_time_ms=TS * 1000 - 250)
    out = stages.verify(_recorded(req, "R1", TS * 1000), CONFIG, TS * 1000)
    assert out.kind == "dedupe" and out.record["event_time_ms"] == TS * 1000 - 250


def test_payout_facts_follow_the_partner_file() -> None:
    plan = demo_plan.build_plan(CONFIG, 300, 42, RUN_ID)
    facts = demo_plan.payout_facts(plan, CONFIG)
    assert (facts.reporting_currency, facts.timezone) == ("USD", "Europe/Berlin")
    assert facts.paused_affiliates == ("aff-social",) and facts.capped_offers == (("gamehub-rpg", 5),)
    assert facts.caps == (demo_plan.CapExpectation("gamehub-rpg", 5, True, Decimal("4.00")),)
    buy = next(s for j in plan.journeys if j.scenario == "clawback" for s in j.postbacks)
    paid = round_money(Decimal(buy.amount) * Decimal("0.08"), buy.currency)
    by = {(e.event, e.payout_reason): e for e in facts.conversions}
    assert (by[("purchase", None)].payout, by[("purchase", None)].payout_currency) == (paid, buy.currency)
    assert (by[("refund", "clawback")].payout, by[("refund", "clawback")].payout_status) == (-paid, "payable")
    assert by[("purchase", "too_fast")].payout_status == "hold" and by[("purchase", "too_fast")].payout == 0
    assert by[("purchase", "affiliate_paused")].payout_status == "hold"
    # rules: the affiliate's override wins; tiers depend on history (not predicted)
    assert demo_plan.planned_payout(CONFIG, "shopco-outlet", "aff-coupons", "purchase", "20.00", "USD") == \
        (Decimal("7.50"), "EUR")
    assert demo_plan.planned_payout(CONFIG, "shopco-outlet", "aff-search", "purchase", "20.00", "USD") == \
        (Decimal("6.00"), "EUR")
    assert demo_plan.planned_payout(CONFIG, "streamly-annual", "aff-search", "purchase", "99.00", "USD") is None
    assert demo_plan.planned_payout(CONFIG, "gamehub-rpg", "aff-search", "signup", None, None) is None


def test_the_engine_decides_the_scenarios_as_the_facts_say() -> None:
    """The facts are computed without the engine; here the engine runs on the scenarios, in sending order."""
    from processors.commission import commission

    plan = demo_plan.build_plan(CONFIG, 300, 42, RUN_ID)
    facts = demo_plan.payout_facts(plan, CONFIG)
    fx = FxRates()
    for rate in parse_fx_csv(demo.DEMO_FX_RATES.read_text(), "demo"):
        fx.add(rate)
    states: dict[str, dict] = {}
    decided: dict[tuple[str, str], dict] = {}
    now_ms = 1_796_630_400_000  # 2026-12-07 in Berlin
    for journey in (j for j in plan.journeys if j.scenario):
        clicked_ms = now_ms
        for step in journey.postbacks:
            now_ms += int(step.delay_s * 1000) + 50
            event_ms = clicked_ms if step.event_at_click else now_ms
            conv = {"conversion_id": f"{step.order_id}-{step.event}", "version": 1, "receipt_id": "R",
                    "advertiser_id": step.advertiser_id, "offer_id": journey.offer_id,
                    "affiliate_id": journey.affiliate_id, "click_id": "C", "event": step.event,
                    "status": step.status, "amount": Decimal(step.amount), "currency": step.currency,
                    "sign": -1 if step.event == "refund" else 1, "event_time_ms": event_ms,
                    "received_at_ms": now_ms, "clicked_at_ms": clicked_ms,
                    "click_to_conversion_s": (event_ms - clicked_ms) // 1000, "attributed": True,
                    "order_id": step.order_id}
            out = commission(conv, CONFIG, states.setdefault(journey.offer_id, {}), fx, now_ms)
            decided[(step.order_id, step.event)] = out
        now_ms += 1000
    for e in facts.conversions:
        out = decided[(e.order_id, e.event)]
        assert (out["payout_status"], out["payout_reason"], out["payout"]) == \
            (e.payout_status, e.payout_reason, e.payout), e
    cap = facts.caps[0]
    capped = [o for (order, _), o in decided.items() if order.startswith("CAP-")]
    assert sum(o["payout_status"] == "payable" for o in capped) == cap.limit
    assert sum(o["payout_reporting"] for o in capped if o["payout_status"] == "payable") == cap.payout_each * cap.limit
    assert {o["payout_reason"] for o in capped if o["payout_status"] != "payable"} == {"cap_daily_conversions"}


def _scenario_rows(paid: Decimal = Decimal("13.43"), clawed: Decimal = Decimal("-13.43")) -> list[ScenarioRow]:
    reporting = round_money(paid * Decimal("1.0790"), "USD")
    return [
        ScenarioRow("shopco", "CLAW-1", "purchase", "payable", "", paid, "EUR", reporting, "2026-12-07"),
        ScenarioRow("shopco", "CLAW-1", "refund", "payable", "clawback", clawed, "EUR", -reporting, "2026-12-07"),
        ScenarioRow("shopco", "FAST-2", "purchase", "hold", "too_fast", Decimal(0), "EUR", Decimal(0), "2026-12-07"),
    ]


_FACTS = demo_plan.PayoutFacts(
    "USD", "Europe/Berlin",
    conversions=(
        demo_plan.PayoutExpectation("clawback CLAW-1", "shopco", "CLAW-1", "purchase", "payable", None,
                                    Decimal("13.43"), "EUR"),
        demo_plan.PayoutExpectation("clawback CLAW-1 refund", "shopco", "CLAW-1", "refund", "payable", "clawback",
                                    Decimal("-13.43"), "EUR", refund_of="CLAW-1"),
        demo_plan.PayoutExpectation("too_fast FAST-2", "shopco", "FAST-2", "purchase", "hold", "too_fast",
                                    Decimal(0), "EUR"),
    ),
    caps=(demo_plan.CapExpectation("gamehub-rpg", 5, True, Decimal("4.00")),),
    paused_affiliates=("aff-social",), capped_offers=(("gamehub-rpg", 5),))
_CAPS = (CapRow("gamehub-rpg", "2026-12-07", 5, 5, Decimal("20.00"), 4, 9),)
_FX = FxRates()
for _rate in parse_fx_csv("date,currency,rate\n2026-12-01,EUR,1.0790\n", "t"):
    _FX.add(_rate)


def test_payout_checks_pass_on_the_expected_decisions() -> None:
    checks = demo_report.payout_checks(_FACTS, _scenario_rows(), _CAPS, {"aff-social": (3, 0, 2)}, _FX)
    assert [c.ok for c in checks] == [True] * 5, checks
    assert checks[0].detail == "payable, 13.43 EUR = 14.49 USD"
    assert checks[1].detail == "payable clawback, -13.43 EUR = -14.49 USD"
    assert checks[3].detail == "2026-12-07: 5/5 payable, paid 20.00 USD, 4 held by the cap"
    assert checks[4].detail == "3 conversions: 2 held affiliate_paused, 0 payable"


def test_payout_checks_catch_wrong_decisions() -> None:
    checks = demo_report.payout_checks(
        _FACTS, _scenario_rows(clawed=Decimal("-13.42"))[1:],
        (CapRow("gamehub-rpg", "2026-12-07", 5, 6, Decimal("24.00"), 3, 9),), {"aff-social": (3, 1, 1)}, _FX)
    failed = {c.label: c.detail for c in checks if not c.ok}
    assert failed["clawback CLAW-1"] == "no payout decision in ClickHouse"
    assert "payout -13.42 EUR, expected -13.43 EUR" in failed["clawback CLAW-1 refund"]
    assert "6 payable, above the cap 5" in failed["cap gamehub-rpg daily_conversions 5"]
    assert "paid 24.00 USD, expected 20.00 USD" in failed["cap gamehub-rpg daily_conversions 5"]
    assert "1 payable" in failed["paused aff-social"]
    assert "too_fast FAST-2" not in failed


def _payout_report(**overrides: object) -> DemoReport:
    payouts = (
        PayoutRow("aff-cashback", "shopco-spring", 3, Decimal("300.00"), Decimal("24.00"), Decimal(0), 3, 0, 0),
        PayoutRow("aff-cashback", "gamehub-rpg", 2, Decimal("50.00"), Decimal("8.00"), Decimal("4.00"), 3, 1, 0),
        PayoutRow("aff-social", "shopco-spring", 1, Decimal("100.00"), Decimal(0), Decimal(0), 0, 1, 0, 1),
    )
    holds = (HoldRow("hold", "cap_daily_conversions", 1, Decimal("25.00")),
             HoldRow("hold", "affiliate_paused", 1, Decimal("100.00")))
    checks = (PayoutCheck("cap gamehub-rpg daily_conversions 5", True, "2026-12-07: 5/5 payable"),
              PayoutCheck("paused aff-social", True, "1 conversions: 1 held affiliate_paused, 0 payable"))
    fields: dict[str, object] = dict(reporting_currency="USD", payouts=payouts, holds=holds, caps=_CAPS, checks=checks)
    fields.update(overrides)
    return _report(**fields)


def test_format_report_shows_payouts_margin_holds_and_caps_in_the_reporting_currency() -> None:
    text = demo_report.format_report(_payout_report())
    lines = text.splitlines()
    start = lines.index("== Payouts in USD (approved conversions net of refunds and clawbacks; pending shown apart)")
    assert lines[start + 1].split() == ["affiliate", "approved", "revenue", "payout", "margin", "payout/rev",
                                        "pending", "payout", "payable", "held"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[start:] if line.startswith("  aff-")}
    assert rows["aff-cashback"] == ["5", "350.00", "32.00", "318.00", "9.1%", "4.00", "6", "1"]
    assert rows["aff-social"] == ["1", "100.00", "0.00", "100.00", "0.0%", "0.00", "0", "1"]
    assert next(line for line in lines if "= all affiliates" in line and "450.00" in line).split()[3:] == \
        ["6", "450.00", "32.00", "418.00", "7.1%", "4.00", "6", "2"]
    offers = {line.split()[0]: line.split()[1:] for line in lines[start:] if line.startswith(("  gamehub", "  shopco"))}
    assert offers["shopco-spring"][:5] == ["4", "400.00", "24.00", "376.00", "6.0%"]
    assert "  payout-to-margin: payout 32.00 USD of revenue 450.00 USD = 7.1%; margin 418.00 USD (92.9%)" in lines
    assert "1 conversions had no FX rate (fx_missing)" in text
    assert any(line.split() == ["1", "hold", "cap_daily_conversions", "revenue", "25.00", "USD"] for line in lines)
    assert "    gamehub-rpg 2026-12-07: 5/5 payable (20.00 USD), 4 over the cap; this run: 9 conversions" in lines
    assert "    ok    paused aff-social: 1 conversions: 1 held affiliate_paused, 0 payable" in lines
    assert "no payout decisions" in demo_report.format_report(_report(reporting_currency="USD"))
    assert "== Payouts" not in demo_report.format_report(_report())


def test_verdict_fails_on_a_failed_payout_check() -> None:
    ok, message = demo_report.verdict(_payout_report())
    assert ok and "all 2 payout checks passed" in message
    bad = (PayoutCheck("too_fast FAST-2", False, "payable, expected hold too_fast"),)
    ok, message = demo_report.verdict(_payout_report(checks=bad))
    assert not ok and message == "FAILED: 1 of 1 payout checks: too_fast FAST-2: payable, expected hold too_fast"


# --------------------------------------------------------------------------- outbound endpoints


def test_demo_endpoints_answer_by_behaviour() -> None:
    from app.demo.affiliates import RECOVER_AFTER, SLOW_S, answer

    assert answer("healthy", 1) == (200, 0.0)
    assert [answer("recovering", n)[0] for n in range(1, RECOVER_AFTER + 2)] == [503] * RECOVER_AFTER + [200]
    assert answer("slow", 1) == (200, SLOW_S)
    assert answer("bad_request", 3) == (400, 0.0)
    with pytest.raises(ValueError):
        answer("sometimes", 1)


def test_demo_partner_file_points_four_affiliates_at_the_demo_endpoints() -> None:
    from urllib.parse import urlsplit

    from app.demo import DEMO_PARTNERS
    from app.demo.affiliates import DEMO_ENDPOINTS

    config = load_partner_config(DEMO_PARTNERS)
    for affiliate_id, behaviour, port in DEMO_ENDPOINTS:
        (endpoint,) = config.affiliate(affiliate_id).postbacks.values()
        assert urlsplit(endpoint.url).port == port and endpoint.allow_private, affiliate_id
        assert "{idempotency_key}" in endpoint.url
        assert bool(endpoint.secret) == (behaviour == "healthy")


def test_demo_endpoint_records_requests_and_checks_signatures() -> None:
    import hashlib
    import hmac
    import urllib.error
    import urllib.request

    from app.demo.affiliates import AffiliateServer
    from postback.signing import canonical_query

    secret = "demo-endpoint-test-secret-0123"
    server = AffiliateServer("aff-x", "recovering", 0, secret)
    try:
        base = f"http://127.0.0.1:{server.server.server_address[1]}"
        params = [("cid", "c1"), ("k", "conv-1:1"), ("ts", "1767225600")]
        sig = hmac.new(secret.encode(), canonical_query(params).encode(), hashlib.sha256).hexdigest()
        statuses = []
        for query in ("cid=c1&k=conv-1%3A1&ts=1767225600&sig=" + sig,) * 3 + ("cid=c1&ts=1&sig=00",):
            req = urllib.request.Request(f"{base}/pb?{query}", headers={"Idempotency-Key": "conv-1:1"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    statuses.append(resp.status)
            except urllib.error.HTTPError as err:
                statuses.append(err.code)
    finally:
        server.close()
    assert statuses == [503, 503, 200, 200]
    assert [r.signed for r in server.snapshot()] == [True, True, True, False]


def test_delivery_stats_checks_and_summary() -> None:
    from app.demo.affiliates import DeliveryRow, Received, delivery_checks, delivery_stats, format_deliveries

    healthy = delivery_stats(["a:1", "b:1"], [("a:1", 1, "delivered", 10), ("b:1", 1, "delivered", 30)],
                             [Received("a:1", 200, True), Received("b:1", 200, True)])
    recovering = delivery_stats(["c:2"], [("c:2", 1, "retry", 5), ("c:2", 2, "retry", 5), ("c:2", 3, "delivered", 7)],
                                [Received("c:2", 503, False)] * 2 + [Received("c:2", 200, False)])
    bad = delivery_stats(["d:1", "e:1"], [("d:1", 1, "dead", 3), ("e:1", 1, "retry", None), ("e:1", 2, "dead", 3)],
                         [Received("d:1", 400, False)])
    rows = [DeliveryRow("aff-search", "healthy", 2, **healthy), DeliveryRow("aff-coupons", "recovering", 1, **recovering),
            DeliveryRow("aff-cashback", "bad_request", 2, **bad)]
    assert (healthy["delivered"], healthy["p50_ms"], healthy["p99_ms"]) == (2, 10.0, 30.0)
    assert (recovering["delivered"], recovering["retries"], recovering["received_keys"]) == (1, 2, 1)
    assert (bad["dead"], bad["single_attempt_dead"], bad["p50_ms"]) == (2, 1, None)
    checks = delivery_checks(rows)
    assert [c.ok for c in checks] == [True, True, False]
    assert "1 retries" in checks[2].detail
    text = "\n".join(format_deliveries(rows))
    assert "== Outbound postbacks" in text and "aff-coupons" in text and "always 400" in text
    report = _report(deliveries=tuple(rows), delivery_checks=checks)
    assert "== Outbound postbacks" in demo_report.format_report(report)
    assert "FAIL  outbound aff-cashback (bad_request)" in demo_report.format_report(report)
    ok, message = demo_report.verdict(report)
    assert not ok and "outbound delivery checks" in message
    ok, message = demo_report.verdict(_report(deliveries=tuple(rows[:2]), delivery_checks=checks[:2]))
    assert ok and "all 2 outbound delivery checks passed" in message
