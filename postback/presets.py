"""Platform presets: how the trackers advertisers move from name their postback parameters.

Why: an advertiser who switches networks pastes the postback URL template it already
has, written for another tracker. ``preset = "<name>"`` in an advertiser's table fills
in that platform's parameter names (aliases), status codes, event parameter and auth
parameter. The loader (``postback.partner_loader``) merges the advertiser's own keys over
the preset (the four maps entry by entry) and validates the result exactly like a
hand-written table, so a preset can never carry a value a user could not write.

Each preset is a plain table in the partner-file format. ``docs/partners.md`` shows
every preset with the platform's example URL and cites the platform's documentation
for each name. Choices made for the user, all overridable:

- ``auth_modes = ["token"]``: these platforms cannot compute our HMAC. Platforms with a
  token parameter of their own get an alias to ``token``; for the others the token is a
  constant ``token=...`` in the URL template.
- ``defaults.event = "purchase"``: a platform that sends no event (or only on extra
  events) posts its base conversion. A CPL offer sets ``defaults = { event = "lead" }``.
- ``defaults.currency = "USD"`` where the platform sends no currency (its offers carry
  one currency); set ``defaults.currency`` to the offer's currency.
- Platforms whose conversions are identified by the click when no transaction id is
  sent (Keitaro, Binom) list ``purchase`` among ``one_time_events``, so the status
  updates of one click's conversion update one conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["PRESETS"]

_ONE_TIME_WITH_PURCHASE = ["lead", "signup", "install", "trial_start", "purchase"]

_PRESETS: dict[str, dict[str, Any]] = {
    "everflow": {
        "auth_modes": ["token"],
        "aliases": {"transaction_id": "click_id", "adv_event_id": "event", "event_id": "event",
                    "verification_token": "token"},
        "defaults": {"event": "purchase", "currency": "USD"},
    },
    "tune": {
        "auth_modes": ["token"],
        # TUNE's offer_id is TUNE's offer, not ours: kept as an extra (ours comes from the click).
        "aliases": {"transaction_id": "click_id", "adv_sub": "order_id", "goal_id": "event",
                    "security_token": "token", "offer_id": "tune_offer_id"},
        "defaults": {"event": "purchase", "currency": "USD"},
    },
    "affise": {
        "auth_modes": ["token"],
        "aliases": {"clickid": "click_id", "action_id": "order_id", "sum": "amount", "goal": "event",
                    "secure": "token"},
        "status_map": {"1": "approved", "2": "pending", "3": "rejected", "5": "pending"},
        "defaults": {"event": "purchase", "currency": "USD"},
    },
    "voluum": {
        "auth_modes": ["token"],
        "aliases": {"cid": "click_id", "txid": "order_id", "payout": "amount", "et": "event"},
        "defaults": {"event": "purchase", "currency": "USD"},
    },
    "redtrack": {
        "auth_modes": ["token"],
        "aliases": {"clickid": "click_id", "rdtk_event_id": "order_id", "sum": "amount", "type": "event"},
        "status_map": {"Approved": "approved", "Pending": "pending", "Declined": "rejected",
                       "Other": "approved"},
        "defaults": {"event": "purchase", "currency": "USD"},
    },
    "keitaro": {
        "auth_modes": ["token"],
        "aliases": {"subid": "click_id", "tid": "order_id", "payout": "amount", "revenue": "amount"},
        "status_map": {"lead": "pending", "sale": "approved", "rejected": "rejected", "rebill": "approved"},
        "defaults": {"event": "purchase", "currency": "USD"},
        "one_time_events": _ONE_TIME_WITH_PURCHASE,
    },
    "binom": {
        "auth_modes": ["token"],
        "aliases": {"cnv_id": "click_id", "cnv_currency": "currency", "payout": "amount",
                    "cnv_status": "status"},
        "status_map": {"approve": "approved", "approved": "approved", "sale": "approved",
                       "reject": "rejected", "rejected": "rejected", "decline": "rejected",
                       "hold": "pending", "pending": "pending", "lead": "pending"},
        "defaults": {"event": "purchase", "currency": "USD"},
        "one_time_events": _ONE_TIME_WITH_PURCHASE,
    },
    "cake": {
        "auth_modes": ["token"],
        "aliases": {"r": "click_id", "t": "order_id", "p": "amount", "e": "event"},
        "defaults": {"event": "purchase", "currency": "USD"},
    },
}


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(value)
    return value


#: Preset name -> its advertiser table (read-only). Names are lower-case platform names.
PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({name: _frozen(t) for name, t in _PRESETS.items()})
