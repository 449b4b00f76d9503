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

from postback.partners import Advertiser
from processors.normalize import Normalized

#: Receipts remembered per key: enough for any realistic sequence of status changes.
MAX_RECEIPTS = 32


def dedupe_key(n: Normalized, adv: Advertiser, replay_key: str) -> tuple[str, str]:
    """(key, kind) where kind is `order`, `one_time` or `request`."""
    if n.order_id:
        parts, kind = [n.advertiser_id, n.event, n.order_id] + ([n.period] if n.period else []), "order"
    elif n.click_id and n.event in adv.one_time_events:
        parts, kind = [n.advertiser_id, n.event, "click", n.click_id], "one_time"
    else:
        parts, kind = [n.advertiser_id, "sig", replay_key], "request"
    return "|".join(quote(p, safe="") for p in parts), kind


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


def check_retry(entry: dict[str, Any] | None, receipt_id: str, received_at_ms: int,
                window_ms: int) -> tuple[Decision | None, dict[str, Any] | None]:
    """Replay detection: the same signed request seen within `window_ms` is a retry.

    Returns (decision or None to continue, the entry to store or None to leave as is).
    """
    if entry is not None and entry["r"] != receipt_id and received_at_ms - int(entry["t"]) <= window_ms:
        return Decision("duplicate", first_receipt=entry["r"], reason="retry"), None
    if entry is not None and entry["r"] == receipt_id:
        return None, None  # our own earlier processing
    return None, {"r": receipt_id, "t": received_at_ms}


def decide(entry: dict[str, Any] | None, kind: str, receipt_id: str, status: str, received_at_ms: int,
           horizon_ms: int) -> tuple[Decision, dict[str, Any] | None]:
    """The outcome for one receipt under its dedupe key, and the entry to store (None: unchanged)."""
    if entry is not None and receipt_id in entry["receipts"]:
        version = entry["receipts"][receipt_id]
        return Decision("conversion", version=version, first_receipt=entry["first"]), None
    if _expired(entry, received_at_ms, horizon_ms):
        new = {"first": receipt_id, "status": status, "version": 1, "t": received_at_ms,
               "receipts": {receipt_id: 1}}
        return Decision("conversion", version=1, first_receipt=receipt_id), new
    assert entry is not None
    if status != entry["status"]:
        version = int(entry["version"]) + 1
        receipts = dict(entry["receipts"])
        receipts[receipt_id] = version
        if len(receipts) > MAX_RECEIPTS:
            receipts.pop(next(iter(receipts)))
        updated = dict(entry, status=status, version=version, receipts=receipts)
        return Decision("conversion", version=version, first_receipt=entry["first"],
                        previous_status=entry["status"]), updated
    reason = {"order": "order_repeat", "one_time": "one_time_event_repeat"}.get(kind, "retry")
    return Decision("duplicate", first_receipt=entry["first"], reason=reason), None
