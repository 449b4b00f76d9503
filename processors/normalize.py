"""Turn an authenticated postback's parameters into canonical fields, or say precisely why not.

Runs after signature verification (aliases never affect what was signed). Reads the
advertiser's aliased view with its defaults (`postback.partner_view`), as the ingester does. Money is
`Decimal` end to end: amounts are parsed from their decimal text, never through float,
and limited to what `Decimal(18, 6)` holds. The result is a pure function of the
parameters and the advertiser's configuration, so reprocessing is deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from postback.partner_view import AUTH_PARAMS, CORE_PARAMS, read
from postback.partners import Advertiser

#: Events that reverse money: their amount counts negatively (`sign = -1`).
REVERSAL_EVENTS = frozenset({"refund", "chargeback"})

_AMOUNT = re.compile(r"^-?(\d{1,12})(?:\.(\d{1,6}))?$")
_CURRENCY = re.compile(r"^[A-Za-z]{3}$")
_ID = re.compile(r"^[A-Za-z0-9_.:\-/]{1,128}$")
_SIX_PLACES = Decimal("0.000001")


class Invalid(ValueError):
    """A rejection: `reason` is a Rejection reason code, `detail` says which field and why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Normalized:
    advertiser_id: str
    event: str
    status: str
    sign: int
    click_id: str | None
    order_id: str | None
    customer_id: str | None
    period: str | None
    offer_id: str | None
    amount: Decimal | None
    currency: str | None
    event_time_ms: int | None
    extras: tuple[tuple[str, str], ...]


def parse_amount(text: str, event: str) -> Decimal:
    match = _AMOUNT.match(text.strip())
    if not match:
        raise Invalid("invalid_field", "amount: expected a decimal with at most 12 integer and 6 fraction digits")
    amount = Decimal(text.strip())
    if amount < 0 and event not in REVERSAL_EVENTS:
        raise Invalid("invalid_field", "amount: negative amounts are only allowed on refund/chargeback")
    return abs(amount).quantize(_SIX_PLACES)


def parse_event_time(text: str) -> int:
    """Unix seconds, unix milliseconds (> 10^11) or ISO-8601 with a timezone, as epoch ms."""
    text = text.strip()
    if text.isdigit():
        value = int(text)
        return value if value > 10**11 else value * 1000
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Invalid("invalid_field", "event_time: expected unix seconds/ms or ISO-8601") from None
    if parsed.tzinfo is None:
        raise Invalid("invalid_field", "event_time: ISO-8601 needs a timezone (e.g. Z)")
    return int(parsed.timestamp() * 1000)


def _canonical_params(params: list[tuple[str, str]], adv: Advertiser) -> dict[str, str]:
    """The advertiser's aliased view (the same one the ingester and the verifier read), without auth parameters."""
    view = read(params, adv)
    repeated = [name for name in view.repeated if name in CORE_PARAMS]
    if repeated:
        raise Invalid("invalid_field", f"{repeated[0]}: given more than once (after alias mapping)")
    return {k: v for k, v in view.fields.items() if k not in AUTH_PARAMS}


def _optional_id(fields: dict[str, str], name: str) -> str | None:
    value = fields.get(name, "").strip()
    if not value:
        return None
    if not _ID.match(value):
        raise Invalid("invalid_field", f"{name}: 1-128 characters of A-Z a-z 0-9 _ . : - /")
    return value


def normalize(params: list[tuple[str, str]], adv: Advertiser) -> Normalized:
    """Canonical fields of one postback; raises `Invalid` with a reason code."""
    fields = _canonical_params(params, adv)
    raw_event = fields.get("event", "").strip()
    if not raw_event:
        raise Invalid("missing_field", "event")
    event = adv.map_event(raw_event)
    if event is None:
        raise Invalid("unknown_event", f"event: {raw_event[:64]!r} is neither canonical nor mapped")
    status = adv.map_status(fields.get("status"))
    if status is None:
        raise Invalid("invalid_status", f"status: {fields.get('status', '')[:32]!r} is not mapped")
    amount_text = fields.get("amount", "").strip()
    currency_text = fields.get("currency", "").strip()
    amount = parse_amount(amount_text, event) if amount_text else None
    currency = None
    if amount is not None:
        if not currency_text:
            raise Invalid("currency_required", "currency: an ISO-4217 code is required with an amount")
        if not _CURRENCY.match(currency_text):
            raise Invalid("invalid_field", "currency: expected a three-letter ISO-4217 code")
        currency = currency_text.upper()
    elif currency_text:
        if not _CURRENCY.match(currency_text):
            raise Invalid("invalid_field", "currency: expected a three-letter ISO-4217 code")
        currency = currency_text.upper()
    event_time = fields.get("event_time", "").strip()
    return Normalized(
        advertiser_id=adv.advertiser_id,
        event=event,
        status=status,
        sign=-1 if event in REVERSAL_EVENTS else 1,
        click_id=_optional_id(fields, "click_id"),
        order_id=_optional_id(fields, "order_id"),
        customer_id=_optional_id(fields, "customer_id"),
        period=_optional_id(fields, "period"),
        offer_id=_optional_id(fields, "offer_id"),
        amount=amount,
        currency=currency,
        event_time_ms=parse_event_time(event_time) if event_time else None,
        extras=tuple((k, val) for k, val in fields.items() if k not in CORE_PARAMS),
    )
