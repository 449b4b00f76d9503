"""The three processing stages as plain functions over records and table-like mappings.

The faust application (`processors.app`) only moves records between topics and hands
these functions its tables; everything that decides an outcome lives here, where it is
unit-tested with dicts and replays deterministically.

    raw-postbacks --verify--> dedupe topic (key: dedupe key) --dedupe--> attribute topic
    (key: click_id) --attribute--> conversions;   clicks --> clicks table (same partitions)

Every receipt ends in exactly one of conversions, rejections or duplicates. Outputs are
`Output(kind, key, record)` with kind one of `conversion`, `rejection`, `duplicate`,
`dedupe` (to the dedupe topic), `attribute` (to the attribute topic).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from postback.partner_view import read
from postback.partners import PartnerConfig
from processors.attribution import attribute
from processors.dedupe import check_retry, conversion_id, decide, dedupe_key, remember_replay, replayed_duplicate
from processors.normalize import Invalid, normalize
from processors.signing import AuthFailed, authenticate

#: How long a conversion waits for its click to arrive before it is emitted unattributed.
DEFAULT_LATE_CLICK_WAIT_MS = 10 * 60_000


@dataclass(frozen=True)
class Output:
    kind: str
    key: str
    record: dict[str, Any]


def _pairs(kvs: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(kv["key"], kv["value"]) for kv in kvs]


def rejection(raw: dict[str, Any], reason: str, detail: str, now_ms: int,
              advertiser_id: str | None = None, event: str | None = None) -> Output:
    record = {"receipt_id": raw["receipt_id"], "received_at_ms": raw["received_at_ms"], "processed_at_ms": now_ms,
              "advertiser_id": advertiser_id, "event": event, "reason": reason, "detail": detail[:500], "raw": raw}
    return Output("rejection", raw["receipt_id"], record)


def _sent_event(params: list[tuple[str, str]], adv: Any) -> str | None:
    """The event as the advertiser's aliases and default read it (as normalise does), for a rejection.

    Only rejections need it: an accepted postback's event comes from `normalize`, which
    reads the aliased view itself, so the hot path reads it once.
    """
    return read(params, adv).get("event")


def verify(raw: dict[str, Any], partners: PartnerConfig, now_ms: int) -> Output:
    """Stage 1: authenticate and normalise one RawPostback. Rejection, or a message for the dedupe stage."""
    params = _pairs(raw["params"])
    advertiser_id = next((v for k, v in params if k == "advertiser_id"), None)
    adv = partners.advertiser(advertiser_id) if advertiser_id else None
    if adv is None:
        return rejection(raw, "unknown_advertiser", f"advertiser_id {str(advertiser_id)[:64]!r} is not configured",
                         now_ms, None, next((v for k, v in params if k == "event"), None))
    headers = {kv["key"].lower(): kv["value"] for kv in raw["headers"]}
    auth = authenticate(adv, params, headers, raw["body"], raw["content_type"], raw["remote_ip"],
                        raw["received_at_ms"])
    if isinstance(auth, AuthFailed):
        return rejection(raw, auth.reason, auth.detail, now_ms, adv.advertiser_id, _sent_event(params, adv))
    try:
        n = normalize(params, adv)
    except Invalid as exc:
        return rejection(raw, exc.reason, exc.detail, now_ms, adv.advertiser_id, _sent_event(params, adv))
    if n.offer_id and partners.offer(n.offer_id) is None:
        return rejection(raw, "unknown_offer", f"offer_id {n.offer_id!r} is not configured", now_ms,
                         adv.advertiser_id, n.event)
    key, kind = dedupe_key(n, adv, auth.replay_key)
    message = {
        "receipt_id": raw["receipt_id"], "received_at_ms": raw["received_at_ms"], "advertiser_id": n.advertiser_id,
        "event": n.event, "status": n.status, "sign": n.sign, "click_id": n.click_id, "order_id": n.order_id,
        "customer_id": n.customer_id, "period": n.period, "offer_id": n.offer_id,
        "amount": None if n.amount is None else str(n.amount), "currency": n.currency,
        "event_time_ms": n.event_time_ms, "auth_mode": auth.mode, "extras": [list(p) for p in n.extras],
        "dedupe_key": key, "kind": kind, "replay_key": f"{n.advertiser_id}|{auth.replay_key}",
        "replay_window_ms": adv.timestamp_tolerance_ms, "horizon_ms": adv.dedupe_horizon_ms,
    }
    return Output("dedupe", key, message)


def _conversion(msg: dict[str, Any], version: int, now_ms: int) -> dict[str, Any]:
    return {
        "conversion_id": conversion_id(msg["dedupe_key"]), "receipt_id": msg["receipt_id"],
        "advertiser_id": msg["advertiser_id"], "offer_id": msg["offer_id"], "affiliate_id": None,
        "campaign_id": None, "click_id": msg["click_id"], "sub1": None, "sub2": None, "sub3": None, "sub4": None,
        "sub5": None, "event": msg["event"], "status": msg["status"], "order_id": msg["order_id"],
        "customer_id": msg["customer_id"], "period": msg["period"],
        "amount": None if msg["amount"] is None else Decimal(msg["amount"]), "currency": msg["currency"],
        "event_time_ms": msg["event_time_ms"], "received_at_ms": msg["received_at_ms"], "processed_at_ms": now_ms,
        "clicked_at_ms": None, "attributed": False, "attribution": "no_click_id", "click_to_conversion_s": None,
        "dedupe_key": msg["dedupe_key"], "version": version, "sign": msg["sign"], "auth_mode": msg["auth_mode"],
        "extras": [{"key": k, "value": v} for k, v in msg["extras"]],
    }


def dedupe(msg: dict[str, Any], table: MutableMapping[str, Any], partition: int, now_ms: int) -> Output:
    """Stage 2, on the partition of the dedupe key: retries and repeats become Duplicates.

    Entries remember their partition (`p`) so that expiry, which runs per partition,
    only deletes keys that partition's changelog owns.
    """
    table_key = "d:" + msg["dedupe_key"]
    entry = table.get(table_key)
    seen = ((entry or {}).get("rk") or {}).get(msg["replay_key"])
    retry = check_retry(seen, msg["receipt_id"], msg["received_at_ms"], msg["replay_window_ms"]) or \
        replayed_duplicate(seen, msg["receipt_id"])
    if retry is not None:
        return _duplicate(msg, retry.first_receipt, retry.reason, now_ms)
    decision, updated = decide(entry, msg["kind"], msg["receipt_id"], msg["status"], msg["received_at_ms"],
                               msg["horizon_ms"], msg["event_time_ms"])
    own = seen is not None and seen[0] == msg["receipt_id"]  # this receipt, processed again after a crash
    if updated is not None or not own:
        base = updated if updated is not None else entry
        assert base is not None  # decide() returns a new entry when there was none
        if not own:
            base = remember_replay(base, msg["replay_key"], msg["receipt_id"], msg["received_at_ms"],
                                   msg["replay_window_ms"], decision if decision.outcome == "duplicate" else None)
        table[table_key] = dict(base, p=partition, h=msg["horizon_ms"])
    if decision.outcome == "duplicate":
        return _duplicate(msg, decision.first_receipt, decision.reason, now_ms)
    conversion = _conversion(msg, decision.version, now_ms)
    if msg["click_id"]:
        return Output("attribute", msg["click_id"], conversion)
    return Output("conversion", conversion["conversion_id"], conversion)


def _duplicate(msg: dict[str, Any], first: str, reason: str, now_ms: int) -> Output:
    record = {"receipt_id": msg["receipt_id"], "first_receipt_id": first, "received_at_ms": msg["received_at_ms"],
              "processed_at_ms": now_ms, "advertiser_id": msg["advertiser_id"], "event": msg["event"],
              "order_id": msg["order_id"], "dedupe_key": msg["dedupe_key"], "reason": reason}
    return Output("duplicate", msg["receipt_id"], record)


OfferLookup = Callable[[str | None], Any]


def _attributed(conversion: dict[str, Any], click: dict[str, Any] | None, partners: PartnerConfig,
                now_ms: int) -> Output:
    offer_id = conversion.get("offer_id") or (click or {}).get("offer_id")
    out = attribute(conversion, click, partners.offer(offer_id) if offer_id else None)
    out["processed_at_ms"] = now_ms
    return Output("conversion", out["conversion_id"], out)


#: An emitted waiting conversion is forgotten only this long after it was emitted, by a later event:
#: by then the event that emitted it is committed, so no replay can need its output again.
EMITTED_GRACE_MS = 60_000


def attribute_conversion(conversion: dict[str, Any], clicks: Mapping[str, Any], pending: MutableMapping[str, Any],
                         partition: int, partners: PartnerConfig, now_ms: int,
                         wait_ms: int = DEFAULT_LATE_CLICK_WAIT_MS) -> list[Output]:
    """Stage 3, on the partition of the click ID: attribute now, or wait for a late click."""
    click_id = conversion["click_id"]
    click = clicks.get(click_id)
    if click is not None:
        return [_attributed(conversion, click, partners, now_ms)]
    waiting = dict(pending.get(click_id) or {"p": partition, "items": {}})
    items = dict(waiting["items"])
    if conversion["receipt_id"] in items:
        return []  # replayed: it is already waiting (or was emitted by the event that emitted it)
    items[conversion["receipt_id"]] = {"deadline": now_ms + wait_ms, "conversion": encode_internal(conversion)}
    pending[click_id] = dict(waiting, items=items)
    return []


def _release(waiting: dict[str, Any], ready: Callable[[dict[str, Any]], bool], click: dict[str, Any] | None,
             partners: PartnerConfig, now_ms: int, event_id: str) -> tuple[list[Output], dict[str, Any] | None]:
    """Emit the waiting items that are `ready`, remembering which event emitted each.

    Why not just delete them: processing is at-least-once. If the worker dies after this
    state change but before the outputs are flushed, the same event is processed again and
    must emit them again. So an emitted item keeps its output and the id of the event that
    emitted it; replaying that event re-emits exactly those outputs. Emitted items are
    deleted later (after EMITTED_GRACE_MS), by another event.
    """
    outputs: list[Output] = []
    items = dict(waiting["items"])
    changed = False
    for receipt, item in waiting["items"].items():
        if "out" in item:
            if item["by"] == event_id:  # this very event, replayed
                outputs.append(Output("conversion", item["out"]["conversion_id"], decode_internal(item["out_json"])))
            continue
        if not ready(item):
            continue
        out = _attributed(decode_internal(item["conversion"]), click, partners, now_ms)
        items[receipt] = dict(item, out={"conversion_id": out.key}, out_json=encode_internal(out.record),
                              by=event_id, emitted_at=now_ms)
        outputs.append(out)
        changed = True
    return outputs, (dict(waiting, items=items) if changed else None)


def click_arrived(click: dict[str, Any], clicks: MutableMapping[str, Any], pending: MutableMapping[str, Any],
                  partners: PartnerConfig, now_ms: int, event_id: str = "") -> list[Output]:
    """A click is stored; conversions that waited for it are attributed now."""
    click_id = click["click_id"]
    stored = {name: click.get(name) for name in
              ("clicked_at_ms", "offer_id", "affiliate_id", "campaign_id", "sub1", "sub2", "sub3", "sub4", "sub5")}
    if clicks.get(click_id) != stored:
        clicks[click_id] = stored
    waiting = pending.get(click_id)
    if not waiting:
        return []
    outputs, updated = _release(waiting, lambda _item: True, stored, partners, now_ms, event_id)
    if updated is not None:
        pending[click_id] = updated
    return outputs


def expire_pending(entries: Iterable[tuple[str, Any]], pending: MutableMapping[str, Any], partners: PartnerConfig,
                   now_ms: int, event_id: str = "") -> tuple[list[Output], dict[str, dict[str, Any] | None]]:
    """Conversions whose click did not arrive in time are emitted unattributed (`no_click`).

    `entries` are the pending entries this tick visits (`PendingIndex.due`): the due ones,
    and after a restart the ones a replayed tick may have emitted from (see `_release`).
    Also forgets items emitted more than EMITTED_GRACE_MS ago. Returns the outputs and
    each visited entry's new value (None when it was deleted).
    """
    outputs: list[Output] = []
    after: dict[str, dict[str, Any] | None] = {}
    for click_id, waiting in entries:
        released, updated = _release(waiting, lambda item: item["deadline"] <= now_ms, None, partners, now_ms,
                                     event_id)
        outputs.extend(released)
        current = updated or waiting
        keep = {r: item for r, item in current["items"].items()
                if "out" not in item or now_ms - item["emitted_at"] <= EMITTED_GRACE_MS or item["by"] == event_id}
        if not keep:
            del pending[click_id]
            after[click_id] = None
        elif updated is not None or len(keep) != len(current["items"]):
            after[click_id] = pending[click_id] = dict(current, items=keep)
        else:
            after[click_id] = current
    return outputs, after


def next_visit_ms(waiting: dict[str, Any] | None) -> int | None:
    """When a pending entry next needs a tick: its earliest deadline, or when an emitted item
    may be forgotten; None when there is no entry."""
    if not waiting or not waiting["items"]:
        return None
    return min(item["emitted_at"] + EMITTED_GRACE_MS + 1 if "out" in item else item["deadline"]
               for item in waiting["items"].values())


def recently_emitted(waiting: dict[str, Any], since_ms: int) -> bool:
    """Whether an item of this pending entry was emitted at or after `since_ms`."""
    return any("out" in item and item["emitted_at"] >= since_ms for item in waiting["items"].values())


def expire_dedupe(entries: Iterable[tuple[str, Any]], table: MutableMapping[str, Any], now_ms: int,
                  default_horizon_ms: int) -> int:
    """Delete the dedupe `entries` older than their advertiser's horizon (state stays bounded); returns how many.

    A receipt of an order whose entry expired is a new conversion again (issue 4's horizon).
    """
    removed = 0
    for key, entry in entries:
        if now_ms - int(entry["t"]) > int(entry.get("h", default_horizon_ms)):
            del table[key]
            removed += 1
    return removed


def expire_clicks(entries: Iterable[tuple[str, Any]], clicks: MutableMapping[str, Any], now_ms: int,
                  horizon_ms: int) -> int:
    """Delete the clicks older than `horizon_ms` (longer than any attribution window); returns how many.

    A conversion for a forgotten click is emitted unattributed (`no_click`) after the late-click
    wait instead of `expired`: the horizon keeps clicks well past the longest window so that
    this only happens to conversions that come very late.
    """
    removed = 0
    for click_id, click in entries:
        clicked_at = click.get("clicked_at_ms")
        if clicked_at is not None and now_ms - int(clicked_at) > horizon_ms:
            del clicks[click_id]
            removed += 1
    return removed


def encode_internal(record: dict[str, Any]) -> str:
    """JSON for internal topics and tables; Decimal amounts travel as their exact text."""
    return json.dumps(record, default=str, separators=(",", ":"))


def decode_internal(text: str | bytes) -> dict[str, Any]:
    return exact_amount(json.loads(text))


def exact_amount(record: dict[str, Any]) -> dict[str, Any]:
    """Back from internal JSON: the amount's exact text becomes a Decimal again (in place)."""
    if record.get("amount") is not None:
        record["amount"] = Decimal(record["amount"])
    return record
