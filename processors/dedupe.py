"""Deduplication decisions: pure functions over one state entry, so they are testable and replayable.

Keys (`dedupe_key`):

- with an order ID: (advertiser, event, order_id[, period]): a renewal for period 2026-03
  is a different conversion from the one for 2026-04;
- without one, for the advertiser's one-time events (lead, signup, install, trial_start by
  default): (advertiser, event, "click", click_id);
- otherwise nothing identifies a repeat but the request itself: (advertiser, "sig",
  replay_key), which only catches retries of the same signed request.

`conversion_id` is a hash of the key, so every update of one order keeps one id.

Why the `receipts` map: processing is at-least-once. After a crash, events after the last
committed offset are processed again, while the table (restored from its changelog) may
already hold their effect. A receipt found in `receipts` is therefore *our own earlier
processing*, and gets the very same outcome again (same conversion id and version), never
a `Duplicate` of itself. Later consumers see identical records and ReplacingMergeTree
collapses them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from postback.partner_view import order_key
from postback.partners import Advertiser
from processors.normalize import Normalized

#: Receipts remembered per key: enough for any realistic sequence of status changes.
MAX_RECEIPTS = 32
#: Signed requests (replay keys) remembered per key within the timestamp tolerance.
MAX_REPLAYS = 16


def dedupe_key(n: Normalized, adv: Advertiser, replay_key: str) -> tuple[str, str]:
    """(key, kind) where kind is `order`, `one_time` or `request` (`postback.partner_view.order_key`)."""
    found = order_key(n.advertiser_id, n.event, n.order_id, n.period, n.click_id, adv.one_time_events)
    if found is not None:
        return found
    return "|".join(quote(p, safe="") for p in (n.advertiser_id, "sig", replay_key)), "request"


def conversion_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Decision:
    """`outcome` is `conversion` (emit with `version`) or `duplicate` (of `first_receipt`, `reason`)."""

    outcome: str
    version: int = 0
    first_receipt: str = ""
    reason: str = ""
    previous_status: str | None = None


def _expired(entry: dict[str, Any] | None, now_ms: int, horizon_ms: int) -> bool:
    return entry is None or now_ms - int(entry["t"]) > horizon_ms


def check_retry(seen: list[Any] | None, receipt_id: str, received_at_ms: int, window_ms: int) -> Decision | None:
    """Replay detection: the same signed request seen within `window_ms` is a retry.

    `seen` is `[first receipt, its received_at_ms]` remembered for this request's replay key
    (see `remember_replay`), or None. Our own earlier processing of this receipt is not a retry.
    """
    if seen is not None and seen[0] != receipt_id and received_at_ms - int(seen[1]) <= window_ms:
        return Decision("duplicate", first_receipt=seen[0], reason="retry")
    return None


def remember_replay(entry: dict[str, Any], replay_key: str, receipt_id: str, received_at_ms: int,
                    window_ms: int, duplicate: Decision | None = None) -> dict[str, Any]:
    """`entry` with this request's replay key recorded under `rk`, and, when the receipt
    was judged a `duplicate`, that judgement (see `replayed_duplicate`).

    Why inside the dedupe entry: a retry of a signed request carries the very same
    parameters, so it always meets the entry of its dedupe key. Keeping its replay key
    there makes one table write per receipt instead of two. Keys older than the window
    are dropped, and at most MAX_REPLAYS are kept: a retry of an evicted request is still
    a duplicate, reported as the dedupe key's repeat instead of `retry`.
    """
    replays = {key: seen for key, seen in (entry.get("rk") or {}).items()
               if received_at_ms - int(seen[1]) <= window_ms}
    replays[replay_key] = [receipt_id, received_at_ms] + \
        ([duplicate.first_receipt, duplicate.reason] if duplicate is not None else [])
    while len(replays) > MAX_REPLAYS:
        replays.pop(next(iter(replays)))
    return dict(entry, rk=replays)


def replayed_duplicate(seen: list[Any] | None, receipt_id: str) -> Decision | None:
    """This receipt processed again (at-least-once) after it was judged a duplicate: the same judgement.

    Why stored, not recomputed: the table may already hold the effect of later receipts
    (a status update), under which the repeat would now look like an update.
    """
    if seen is not None and seen[0] == receipt_id and len(seen) >= 4:
        return Decision("duplicate", first_receipt=seen[2], reason=seen[3])
    return None


def _newer(entry: dict[str, Any], received_at_ms: int, event_time_ms: int | None) -> bool:
    """Whether an update happened after the one that set the entry's current status.

    By the advertiser's event time when both updates carry one and they differ, else by
    the ingester's receipt time; a tie goes to the update processed later. Entries
    written before this rule have no `r`: their first receipt time stands in.
    """
    current_event = entry.get("e")
    if event_time_ms is not None and current_event is not None and event_time_ms != current_event:
        return event_time_ms > int(current_event)
    return received_at_ms >= int(entry.get("r", entry["t"]))


def decide(entry: dict[str, Any] | None, kind: str, receipt_id: str, status: str, received_at_ms: int,
           horizon_ms: int, event_time_ms: int | None = None) -> tuple[Decision, dict[str, Any] | None]:
    """The outcome for one receipt under its dedupe key, and the entry to store (None: unchanged).

    An order's final status follows the order in which its updates happened, not the
    order in which they are processed: an update older than the one behind the current
    status (`_newer`) changes nothing and is a `superseded` duplicate. So a repartition,
    a rebalance or a raw record keyed by receipt id can never leave an order `approved`
    after its `rejected`.
    """
    if entry is not None and receipt_id in entry["receipts"]:
        version = entry["receipts"][receipt_id]
        return Decision("conversion", version=version, first_receipt=entry["first"]), None
    if _expired(entry, received_at_ms, horizon_ms):
        new = {"first": receipt_id, "status": status, "version": 1, "t": received_at_ms, "r": received_at_ms,
               "e": event_time_ms, "receipts": {receipt_id: 1}}
        return Decision("conversion", version=1, first_receipt=receipt_id), new
    assert entry is not None
    if status != entry["status"]:
        if not _newer(entry, received_at_ms, event_time_ms):
            return Decision("duplicate", first_receipt=entry["first"], reason="superseded"), None
        version = int(entry["version"]) + 1
        receipts = dict(entry["receipts"])
        receipts[receipt_id] = version
        if len(receipts) > MAX_RECEIPTS:
            receipts.pop(next(iter(receipts)))
        updated = dict(entry, status=status, version=version, receipts=receipts, r=received_at_ms,
                       e=event_time_ms)
        return Decision("conversion", version=version, first_receipt=entry["first"],
                        previous_status=entry["status"]), updated
    reason = {"order": "order_repeat", "one_time": "one_time_event_repeat"}.get(kind, "retry")
    return Decision("duplicate", first_receipt=entry["first"], reason=reason), None
