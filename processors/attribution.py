"""Attribution of a conversion to its click: a pure function of the two records and the offer.

A conversion is `attributed` when its event time (else its receipt time) falls within the
offer's window after the click (a small clock-skew allowance before the click is
tolerated); `expired` when the click exists but the window has passed (click fields are
still filled, `attributed` is false); `no_click` when the click never arrived within the
late-click wait; `no_click_id` when the postback named no click.
"""

from __future__ import annotations

from typing import Any

from postback.partners import Offer

DEFAULT_WINDOW_MS = 30 * 86_400_000
#: Advertiser clocks run a little ahead sometimes; an event up to this before its click still counts.
CLOCK_SKEW_MS = 5 * 60_000
CLICK_FIELDS = ("offer_id", "affiliate_id", "campaign_id", "sub1", "sub2", "sub3", "sub4", "sub5")


def attribute(conversion: dict[str, Any], click: dict[str, Any] | None, offer: Offer | None) -> dict[str, Any]:
    """A copy of `conversion` with the attribution fields set."""
    out = dict(conversion)
    if not conversion.get("click_id"):
        out.update(attributed=False, attribution="no_click_id")
        return out
    if click is None:
        out.update(attributed=False, attribution="no_click")
        return out
    event_ms = conversion.get("event_time_ms") or conversion["received_at_ms"]
    delta_ms = event_ms - click["clicked_at_ms"]
    window_ms = offer.window_ms(conversion["event"]) if offer else DEFAULT_WINDOW_MS
    within = -CLOCK_SKEW_MS <= delta_ms <= window_ms
    for name in CLICK_FIELDS:
        if name == "offer_id" and conversion.get("offer_id"):
            continue
        out[name] = click.get(name)
    out.update(clicked_at_ms=click["clicked_at_ms"], click_to_conversion_s=max(delta_ms, 0) // 1000,
               attributed=within, attribution="attributed" if within else "expired")
    return out
