"""The decision logic of all three stages, with plain dicts as tables."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from postback.partners import parse_partner_config
from processors import stages
from processors.signing import sign_json, sign_query

SECRET = "demo-secret-k1-0123456789abcdef"
TOKEN = "demo-legacy-token-0123456789abcdef"
PARTNERS = parse_partner_config(f"""
[advertisers.demo]
auth_modes = ["hmac", "token"]
secrets = {{ k1 = "{SECRET}" }}
token = "{TOKEN}"
aliases = {{ transaction_id = "order_id", sum = "amount" }}
event_map = {{ sale = "purchase" }}
status_map = {{ "1" = "approved", "0" = "pending" }}
[advertisers.hmaconly]
secrets = {{ h1 = "hmaconly-secret-0123456789" }}
allow_ips = ["10.0.0.0/8"]
[offers.offer-1]
advertiser_id = "demo"
attribution_window_days = 7
""")
NOW = 1_800_000_000_000


def raw(params: list[tuple[str, str]], *, receipt: str = "R1", received_at_ms: int = NOW, body: bytes = b"",
        content_type: str | None = None, headers: dict[str, str] | None = None, ip: str = "127.0.0.1") -> dict:
    return {"receipt_id": receipt, "received_at_ms": received_at_ms, "remote_ip": ip, "method": "GET",
            "path": "/postback", "content_type": content_type,
            "params": [{"key": k, "value": v} for k, v in params], "body": body,
            "headers": [{"key": k, "value": v} for k, v in (headers or {}).items()], "ingester_id": "t"}


def signed(params: list[tuple[str, str]], ts_ms: int = NOW, **kw: Any) -> dict:
    return raw(sign_query(params, SECRET, ts_ms // 1000, "k1"), received_at_ms=ts_ms, **kw)


BASE = [("advertiser_id", "demo"), ("event", "purchase"), ("click_id", "C1"), ("order_id", "O1"),
        ("amount", "19.99"), ("currency", "eur")]


def test_valid_signed_postback_goes_to_dedupe_keyed_by_order() -> None:
    out = stages.verify(signed(BASE), PARTNERS, NOW)
    assert out.kind == "dedupe" and out.key == "demo|purchase|O1"
    assert out.record["amount"] == "19.990000" and out.record["currency"] == "EUR"
    assert out.record["auth_mode"] == "hmac" and out.record["kind"] == "order"


@pytest.mark.parametrize(("record", "reason"), [
    (raw([("advertiser_id", "nobody"), ("event", "purchase")]), "unknown_advertiser"),
    (raw(BASE), "missing_signature"),
    (raw(BASE + [("ts", str(NOW // 1000)), ("sig", "0" * 64)]), "bad_signature"),
    (raw(sign_query(BASE, SECRET, NOW // 1000 - 301, "k1")), "stale_timestamp"),
    (raw(sign_query(BASE, SECRET, NOW // 1000, "k9")), "unknown_key_id"),
    (raw(sign_query([("advertiser_id", "hmaconly"), ("event", "lead")], "hmaconly-secret-0123456789",
                    NOW // 1000)), "ip_not_allowed"),
    (raw([("advertiser_id", "hmaconly"), ("event", "lead"), ("token", "x" * 20)], ip="10.1.1.1"),
     "auth_mode_not_allowed"),
    (signed([("advertiser_id", "demo"), ("event", "teleport")]), "unknown_event"),
    (signed([("advertiser_id", "demo"), ("event", "purchase"), ("amount", "1.5")]), "currency_required"),
    (signed([("advertiser_id", "demo"), ("event", "purchase"), ("amount", "1.1234567"), ("currency", "USD")]),
     "invalid_field"),
    (signed([("advertiser_id", "demo"), ("event", "purchase"), ("amount", "1e5"), ("currency", "USD")]),
     "invalid_field"),
    (signed([("advertiser_id", "demo"), ("event", "purchase"), ("status", "maybe")]), "invalid_status"),
    (signed([("advertiser_id", "demo"), ("event", "purchase"), ("offer_id", "offer-404")]), "unknown_offer"),
    (signed([("advertiser_id", "demo"), ("event", "purchase"), ("order_id", "a"), ("transaction_id", "b")]),
     "invalid_field"),
])
def test_each_rejection_reason(record: dict, reason: str) -> None:
    out = stages.verify(record, PARTNERS, NOW)
    assert out.kind == "rejection", out
    assert out.record["reason"] == reason, out.record["detail"]
    assert out.record["raw"] is record and out.key == record["receipt_id"]


def test_timestamp_is_checked_against_receipt_time_not_processing_time() -> None:
    record = signed(BASE, ts_ms=NOW)
    out = stages.verify(record, PARTNERS, NOW + 3 * 86_400_000)  # processed three days later (consumer lag)
    assert out.kind == "dedupe"


def test_token_mode_aliases_and_mappings() -> None:
    params = [("advertiser_id", "demo"), ("event", "sale"), ("transaction_id", "T9"), ("sum", "5"),
              ("currency", "USD"), ("status", "0"), ("token", TOKEN), ("utm", "x")]
    out = stages.verify(raw(params), PARTNERS, NOW)
    assert out.kind == "dedupe", out.record
    msg = out.record
    assert (msg["event"], msg["order_id"], msg["amount"], msg["status"]) == ("purchase", "T9", "5.000000", "pending")
    assert msg["auth_mode"] == "token" and msg["extras"] == [["utm", "x"]]


def test_json_header_signing() -> None:
    body = b'{"advertiser_id":"demo","event":"purchase","order_id":"J1","amount":"2.50","currency":"USD"}'
    headers = sign_json(body, SECRET, NOW // 1000, "k1")
    record = raw([("advertiser_id", "demo"), ("event", "purchase"), ("order_id", "J1"), ("amount", "2.50"),
                  ("currency", "USD")], body=body, content_type="application/json", headers=headers)
    out = stages.verify(record, PARTNERS, NOW)
    assert out.kind == "dedupe" and out.key == "demo|purchase|J1"


def _through_dedupe(record: dict, table: dict, partition: int = 0) -> stages.Output:
    first = stages.verify(record, PARTNERS, NOW)
    assert first.kind == "dedupe", first.record
    return stages.dedupe(first.record, table, partition, NOW)


def test_order_repeat_status_update_retry_and_reprocessing() -> None:
    table: dict = {}
    pending = dict(BASE + [("status", "0")])
    first = _through_dedupe(signed(list(pending.items()), receipt="R1"), table)
    assert first.kind == "attribute" and first.record["version"] == 1 and first.record["status"] == "pending"

    retry = _through_dedupe(signed(list(pending.items()), receipt="R2"), table)  # same signed request
    assert retry.kind == "duplicate" and retry.record["reason"] == "retry"
    assert retry.record["first_receipt_id"] == "R1"

    again = _through_dedupe(signed(list(pending.items()), ts_ms=NOW + 1000, receipt="R3"), table)
    assert again.kind == "duplicate" and again.record["reason"] == "order_repeat"

    approved = dict(pending, status="1")
    update = _through_dedupe(signed(list(approved.items()), ts_ms=NOW + 2000, receipt="R4"), table)
    assert update.kind == "attribute" and update.record["version"] == 2
    assert update.record["conversion_id"] == first.record["conversion_id"]

    # At-least-once: R1..R4 processed again after a crash give the very same records, and change no state.
    state = json.dumps(table, sort_keys=True)
    replay1 = _through_dedupe(signed(list(pending.items()), receipt="R1"), table)
    replay2 = _through_dedupe(signed(list(pending.items()), receipt="R2"), table)
    replay3 = _through_dedupe(signed(list(pending.items()), ts_ms=NOW + 1000, receipt="R3"), table)
    replay4 = _through_dedupe(signed(list(approved.items()), ts_ms=NOW + 2000, receipt="R4"), table)
    assert (replay1.kind, replay1.record["version"]) == ("attribute", 1)
    assert (replay2.kind, replay2.record["reason"], replay2.record["first_receipt_id"]) == ("duplicate", "retry",
                                                                                             "R1")
    assert (replay3.kind, replay3.record["reason"]) == ("duplicate", "order_repeat")
    assert (replay4.kind, replay4.record["version"]) == ("attribute", 2)
    assert json.dumps(table, sort_keys=True) == state
    # A retry of the repeat R3 (same signed request) points at R3 itself.
    retry3 = _through_dedupe(signed(list(pending.items()), ts_ms=NOW + 1000, receipt="R5"), table)
    assert (retry3.record["reason"], retry3.record["first_receipt_id"]) == ("retry", "R3")


def test_a_retry_outside_the_tolerance_window_is_judged_by_its_key() -> None:
    table: dict = {}
    first = _through_dedupe(signed(BASE, receipt="W1"), table)
    assert first.kind == "attribute"
    msg = stages.verify(signed(BASE, receipt="W2"), PARTNERS, NOW).record
    later = dict(msg, received_at_ms=NOW + msg["replay_window_ms"] + 1)  # same request, after the window
    out = stages.dedupe(later, table, 0, NOW)
    assert (out.kind, out.record["reason"], out.record["first_receipt_id"]) == ("duplicate", "order_repeat", "W1")


def test_replay_keys_per_entry_are_bounded() -> None:
    table: dict = {}
    for i in range(40):  # 40 distinct signed requests for one order (different ts) within the window
        _through_dedupe(signed(BASE, ts_ms=NOW + i * 1000, receipt=f"B{i}"), table)
    [entry] = table.values()
    assert len(entry["rk"]) <= 16


def test_one_time_event_without_order_id_dedupes_per_click() -> None:
    table: dict = {}
    lead = [("advertiser_id", "demo"), ("event", "lead"), ("click_id", "C7")]
    assert _through_dedupe(signed(lead, receipt="L1"), table).kind == "attribute"
    repeat = _through_dedupe(signed(lead, ts_ms=NOW + 5000, receipt="L2"), table)
    assert repeat.kind == "duplicate" and repeat.record["reason"] == "one_time_event_repeat"


def test_renewal_periods_are_distinct_conversions() -> None:
    table: dict = {}
    base = [("advertiser_id", "demo"), ("event", "renewal"), ("order_id", "SUB1"), ("amount", "9"),
            ("currency", "USD")]
    a = _through_dedupe(signed(base + [("period", "2026-03")], receipt="P1"), table)
    b = _through_dedupe(signed(base + [("period", "2026-04")], ts_ms=NOW + 1, receipt="P2"), table)
    assert a.kind == b.kind == "conversion"  # no click_id: straight to conversions, unattributed
    assert a.record["conversion_id"] != b.record["conversion_id"]
    assert a.record["attribution"] == "no_click_id"


def test_refund_is_signed_negative() -> None:
    out = _through_dedupe(signed([("advertiser_id", "demo"), ("event", "refund"), ("order_id", "O1"),
                                  ("amount", "-19.99"), ("currency", "EUR")]), {})
    assert out.record["sign"] == -1 and out.record["amount"] == Decimal("19.990000")


def test_dedupe_entries_expire_after_horizon() -> None:
    table: dict = {}
    _through_dedupe(signed(BASE, receipt="H1"), table, partition=3)
    assert list(table) == ["d:demo|purchase|O1"]  # one entry per receipt's key: the replay key lives in it
    assert stages.expire_dedupe(list(table.items()), table, NOW + 89 * 86_400_000, 1) == 0  # the entry's own horizon
    assert stages.expire_dedupe(list(table.items()), table, NOW + 91 * 86_400_000, 1) == 1
    assert table == {}


def _conversion(receipt: str = "R1", click_id: str = "C1", event_ms: int | None = None) -> dict:
    record = signed(BASE[:2] + [("click_id", click_id), ("order_id", receipt)], receipt=receipt)
    out = _through_dedupe(record, {})
    conv = out.record
    conv["event_time_ms"] = event_ms
    return conv


CLICK = {"click_id": "C1", "clicked_at_ms": NOW - 3_600_000, "offer_id": "offer-1", "affiliate_id": "aff-1",
         "campaign_id": "camp", "sub1": "s1", "sub2": None, "sub3": None, "sub4": None, "sub5": None}


def test_attributed_within_window_and_expired_outside() -> None:
    clicks: dict = {}
    stages.click_arrived(CLICK, clicks, {}, PARTNERS, NOW)
    [out] = stages.attribute_conversion(_conversion(), clicks, {}, 0, PARTNERS, NOW)
    rec = out.record
    assert (rec["attributed"], rec["attribution"], rec["affiliate_id"], rec["sub1"]) == (True, "attributed",
                                                                                          "aff-1", "s1")
    assert rec["click_to_conversion_s"] == 3600 and rec["clicked_at_ms"] == CLICK["clicked_at_ms"]
    late = _conversion("R2", event_ms=NOW + 8 * 86_400_000)  # offer-1 window is 7 days
    [out] = stages.attribute_conversion(late, clicks, {}, 0, PARTNERS, NOW)
    assert (out.record["attributed"], out.record["attribution"]) == (False, "expired")
    assert out.record["affiliate_id"] == "aff-1"


def test_late_click_attributes_waiting_conversion() -> None:
    clicks: dict = {}
    pending: dict = {}
    assert stages.attribute_conversion(_conversion(), clicks, pending, 4, PARTNERS, NOW, wait_ms=60_000) == []
    assert pending["C1"]["p"] == 4
    [out] = stages.click_arrived(CLICK, clicks, pending, PARTNERS, NOW + 1000, "clicks:4:17")
    assert out.record["attribution"] == "attributed"
    # Kept (marked emitted) until a later tick after the grace period, so a replay can re-emit.
    assert stages.expire_pending(list(pending.items()), pending, PARTNERS, NOW + 2000, "tick:4:1")[0] == []
    assert "C1" in pending
    assert stages.next_visit_ms(pending["C1"]) == NOW + 1000 + stages.EMITTED_GRACE_MS + 1
    assert stages.expire_pending(list(pending.items()), pending, PARTNERS, NOW + 1000 + stages.EMITTED_GRACE_MS + 1,
                                 "tick:4:2") == ([], {"C1": None})
    assert pending == {}


def test_replaying_the_emitting_event_emits_the_same_outputs_again() -> None:
    """At-least-once: the click event's state change survived a crash, its outputs did not."""
    clicks: dict = {}
    pending: dict = {}
    stages.attribute_conversion(_conversion(), clicks, pending, 4, PARTNERS, NOW, wait_ms=60_000)
    [first] = stages.click_arrived(CLICK, clicks, pending, PARTNERS, NOW + 1000, "clicks:4:17")
    [again] = stages.click_arrived(CLICK, clicks, pending, PARTNERS, NOW + 5000, "clicks:4:17")  # same event
    assert again.record == first.record and again.key == first.key
    assert stages.click_arrived(CLICK, clicks, pending, PARTNERS, NOW + 6000, "clicks:4:99") == []  # another event
    # A replayed conversion event does not park the receipt a second time.
    assert stages.attribute_conversion(_conversion(), {}, pending, 4, PARTNERS, NOW, wait_ms=60_000) == []
    assert len(pending["C1"]["items"]) == 1


def test_conversion_without_its_click_is_emitted_unattributed_after_the_wait() -> None:
    pending: dict = {}
    stages.attribute_conversion(_conversion(click_id="GONE"), {}, pending, 1, PARTNERS, NOW, wait_ms=60_000)

    def tick(now: int, event_id: str) -> list:
        return stages.expire_pending(list(pending.items()), pending, PARTNERS, now, event_id)[0]

    assert stages.next_visit_ms(pending["GONE"]) == NOW + 60_000

    assert tick(NOW + 30_000, "t:1:1") == []  # still waiting
    [out] = tick(NOW + 61_000, "t:1:2")
    assert (out.record["attributed"], out.record["attribution"]) == (False, "no_click")
    [replayed] = tick(NOW + 62_000, "t:1:2")  # the same tick, replayed
    assert replayed.record == out.record
    assert tick(NOW + 62_000, "t:1:3") == []  # a later tick: nothing new
    tick(NOW + 61_000 + stages.EMITTED_GRACE_MS + 1, "t:1:4")
    assert pending == {}


def test_clicks_are_forgotten_after_the_click_horizon() -> None:
    clicks: dict = {}
    stages.click_arrived(CLICK, clicks, {}, PARTNERS, NOW)
    horizon = 40 * 86_400_000
    assert stages.expire_clicks(list(clicks.items()), clicks, CLICK["clicked_at_ms"] + horizon, horizon) == 0
    assert stages.expire_clicks(list(clicks.items()), clicks, CLICK["clicked_at_ms"] + horizon + 1, horizon) == 1
    assert clicks == {}


def test_internal_encoding_keeps_decimals_exact() -> None:
    record = {"amount": Decimal("0.100000"), "x": 1}
    assert stages.decode_internal(stages.encode_internal(record)) == record



# -- an order's updates processed against the order they happened in ---------------------------
KT_TOKEN = "keitaro-stage-token-0123456789"
KT_PARTNERS = parse_partner_config(f"""
[advertisers.kt]
preset = "keitaro"
token = "{KT_TOKEN}"
""")
KT_KEY = "d:kt|purchase|T-1"


def _kt(status: str, receipt: str, received_at_ms: int, event_time: str | None = None) -> dict:
    """A Keitaro-shaped status update of order T-1 (click K9), authenticated with the token."""
    params = [("advertiser_id", "kt"), ("subid", "K9"), ("tid", "T-1"), ("status", status), ("payout", "10"),
              ("token", KT_TOKEN)] + ([("event_time", event_time)] if event_time else [])
    return raw(params, receipt=receipt, received_at_ms=received_at_ms)


def _kt_dedupe(record: dict, table: dict) -> stages.Output:
    msg = stages.verify(record, KT_PARTNERS, NOW)
    assert msg.kind == "dedupe" and msg.key == "kt|purchase|T-1", msg.record
    return stages.dedupe(msg.record, table, 2, NOW + 10_000)


def test_in_order_status_chain_gives_versions_1_2_3() -> None:
    table: dict = {}
    outs = [_kt_dedupe(_kt(status, f"C{i}", NOW + i * 1000), table)
            for i, status in enumerate(["lead", "sale", "rejected"], start=1)]
    assert [(o.kind, o.key) for o in outs] == [("attribute", "K9")] * 3
    assert [o.record["version"] for o in outs] == [1, 2, 3]
    assert [o.record["status"] for o in outs] == ["pending", "approved", "rejected"]
    assert len({o.record["conversion_id"] for o in outs}) == 1
    entry = table[KT_KEY]
    assert (entry["status"], entry["version"], entry["first"], entry["r"]) == ("rejected", 3, "C1", NOW + 3000)


def test_older_update_processed_after_a_newer_one_is_superseded() -> None:
    """sale received at t=2 is processed after rejected received at t=3: the order stays rejected."""
    table: dict = {}
    rejected = _kt_dedupe(_kt("rejected", "N3", NOW + 3000), table)
    assert (rejected.kind, rejected.record["version"], rejected.record["status"]) == ("attribute", 1, "rejected")
    sale = _kt_dedupe(_kt("sale", "N2", NOW + 2000), table)
    assert sale.kind == "duplicate" and sale.key == "N2"
    assert (sale.record["reason"], sale.record["first_receipt_id"], sale.record["receipt_id"]) == (
        "superseded", "N3", "N2")
    assert sale.record["dedupe_key"] == "kt|purchase|T-1" and sale.record["order_id"] == "T-1"
    entry = table[KT_KEY]
    assert (entry["status"], entry["version"], entry["r"], entry["receipts"]) == ("rejected", 1, NOW + 3000,
                                                                                    {"N3": 1})

    # At-least-once: both receipts processed again give the very same outcomes and change nothing.
    state = json.dumps(table, sort_keys=True)
    again = _kt_dedupe(_kt("sale", "N2", NOW + 2000), table)
    assert (again.kind, again.record) == ("duplicate", sale.record)
    replay = _kt_dedupe(_kt("rejected", "N3", NOW + 3000), table)
    assert (replay.kind, replay.record["version"], replay.record["status"]) == ("attribute", 1, "rejected")
    assert json.dumps(table, sort_keys=True) == state


def test_superseded_judgement_is_kept_for_a_replay_after_later_updates() -> None:
    """After a newer sale changed the status, the replayed old sale is still `superseded`,
    not judged afresh (it would now look like an order repeat)."""
    table: dict = {}
    _kt_dedupe(_kt("rejected", "S3", NOW + 3000), table)
    first = _kt_dedupe(_kt("sale", "S2", NOW + 2000), table)
    assert (first.kind, first.record["reason"]) == ("duplicate", "superseded")
    newer = _kt_dedupe(_kt("sale", "S4", NOW + 4000, event_time="1800000004"), table)
    assert (newer.kind, newer.record["version"], newer.record["status"]) == ("attribute", 2, "approved")
    replay = _kt_dedupe(_kt("sale", "S2", NOW + 2000), table)
    assert (replay.kind, replay.record["reason"], replay.record["first_receipt_id"]) == ("duplicate", "superseded",
                                                                                         "S3")
    assert table[KT_KEY]["status"] == "approved" and table[KT_KEY]["version"] == 2


def test_event_time_decides_against_receipt_time() -> None:
    # rejected happened at e=20 but was received last; the sale happened at e=10, received first.
    table: dict = {}
    late_receipt = _kt_dedupe(_kt("rejected", "E3", NOW + 3000, event_time="1800000020"), table)
    assert late_receipt.record["version"] == 1 and late_receipt.record["event_time_ms"] == 1_800_000_020_000
    # Received later (t=4) but happened earlier (e=10): superseded.
    earlier = _kt_dedupe(_kt("sale", "E4", NOW + 4000, event_time="1800000010"), table)
    assert (earlier.kind, earlier.record["reason"], earlier.record["first_receipt_id"]) == ("duplicate",
                                                                                           "superseded", "E3")
    assert table[KT_KEY]["status"] == "rejected" and table[KT_KEY]["e"] == 1_800_000_020_000

    # The other way round: received earlier (t=1) but happened later (e=30): it wins.
    table2: dict = {}
    _kt_dedupe(_kt("rejected", "F3", NOW + 3000, event_time="1800000020"), table2)
    later = _kt_dedupe(_kt("sale", "F1", NOW + 1000, event_time="1800000030"), table2)
    assert (later.kind, later.record["version"], later.record["status"]) == ("attribute", 2, "approved")
    assert (table2[KT_KEY]["status"], table2[KT_KEY]["e"], table2[KT_KEY]["r"]) == ("approved", 1_800_000_030_000,
                                                                                    NOW + 1000)


def test_receipt_time_decides_when_event_times_are_missing_or_equal() -> None:
    table: dict = {}
    _kt_dedupe(_kt("rejected", "G3", NOW + 3000, event_time="1800000020"), table)
    # Only one side has an event time: by receipt time, which is older.
    assert _kt_dedupe(_kt("sale", "G2", NOW + 2000), table).record["reason"] == "superseded"
    # Equal event times: by receipt time.
    assert _kt_dedupe(_kt("sale", "G1", NOW + 1000, event_time="1800000020"), table).record["reason"] == \
        "superseded"
    # Same receipt time: the update processed later wins.
    tie = _kt_dedupe(_kt("lead", "G4", NOW + 3000, event_time="1800000020"), table)
    assert (tie.kind, tie.record["version"], tie.record["status"]) == ("attribute", 2, "pending")


def test_a_rejection_names_the_event_sent_under_its_alias() -> None:
    """A rejection records the event as the advertiser's aliases read it, like an accepted postback."""
    partners = parse_partner_config(f"""
[advertisers.vl]
auth_modes = ["token"]
token = "{KT_TOKEN}"
aliases = {{ et = "event", cid = "click_id", txid = "order_id" }}
""")
    params = [("advertiser_id", "vl"), ("cid", "C1"), ("txid", "V-1"), ("et", "purchase")]
    forged = stages.verify(raw(params + [("token", KT_TOKEN + "x")]), partners, NOW)
    assert forged.kind == "rejection" and forged.record["reason"] == "bad_signature"
    assert forged.record["event"] == "purchase"
    unknown = stages.verify(raw(params[:-1] + [("et", "bogus"), ("token", KT_TOKEN)]), partners, NOW)
    assert (unknown.record["reason"], unknown.record["event"]) == ("unknown_event", "bogus")
