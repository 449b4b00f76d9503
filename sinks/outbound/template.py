"""Outbound postback URL macros: the values of one conversion, and URL templates filled with them.

Macros: ``{click_id} {sub1}..{sub5} {offer_id} {event} {status} {payout}
{payout_currency} {order_id} {conversion_id} {version} {event_time} {idempotency_key}``.
Which macros a URL may use, and where, is checked when the partner file is loaded
(``postback.partner_model.check_outbound_url``); this module fills them in.

Values, from a conversion mapping (the ``Conversion`` record's fields, or the subset a
retry job carries):

- text fields as they are; ``status`` as its symbol; a missing value (None) is "";
- ``{payout}``: the Decimal as plain decimal text (``"5.000000"``, never an exponent);
- ``{event_time}``: ``event_time_ms`` as ISO-8601 UTC with milliseconds
  (``2026-01-01T12:00:00.000Z``), or a timezone-aware ``event_time`` datetime;
- ``{version}``: decimal text;
- ``{idempotency_key}``: ``"<conversion_id>:<version>"``, also sent as the
  ``Idempotency-Key`` header, so a receiver can drop repeated deliveries of one version.

In a URL each value is percent-encoded per RFC 3986 exactly like the canonical string of
docs/signing.md (UTF-8; only ``A-Z a-z 0-9 - _ . ~`` kept), so a value can never add a
path segment, parameter or fragment. ``fields`` gives the values unencoded: the JSON
body of a POST.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from postback.partner_model import OUTBOUND_MACROS, parse_outbound_url
from postback.signing import encode

__all__ = ["MACROS", "encode", "fields", "idempotency_key", "render"]

#: Every macro an outbound URL may use (the keys of ``fields``).
MACROS: frozenset[str] = OUTBOUND_MACROS

_TEXT_FIELDS = ("click_id", "sub1", "sub2", "sub3", "sub4", "sub5", "offer_id", "event",
                "payout_currency", "order_id", "conversion_id")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return str(getattr(value, "value", value))  # enum symbols by value


def _decimal_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        raise ValueError("payout is a float; money is carried as a Decimal")
    return format(Decimal(value) if not isinstance(value, Decimal) else value, "f")


def _iso_ms(dt: datetime) -> str:
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _event_time(conversion: Mapping[str, Any]) -> str:
    ms = conversion.get("event_time_ms")
    if ms is None:
        dt = conversion.get("event_time")
        if dt is None:
            return ""
        if isinstance(dt, datetime):
            if dt.tzinfo is None:
                raise ValueError("event_time is a naive datetime; give it a timezone (UTC)")
            return _iso_ms(dt)
        return str(dt)
    if isinstance(ms, bool) or not isinstance(ms, int):
        raise ValueError(f"event_time_ms must be an integer (unix milliseconds), got {type(ms).__name__}")
    return _iso_ms(_EPOCH + timedelta(milliseconds=ms))


def idempotency_key(conversion: Mapping[str, Any]) -> str:
    """``"<conversion_id>:<version>"``: the same for every attempt of one conversion version.

    ValueError when the conversion lacks either field.
    """
    conversion_id = conversion.get("conversion_id")
    version = conversion.get("version")
    if conversion_id is None or conversion_id == "":
        raise ValueError("conversion has no conversion_id")
    if version is None or isinstance(version, bool):
        raise ValueError("conversion has no version")
    return f"{conversion_id}:{int(version)}"


def fields(conversion: Mapping[str, Any]) -> dict[str, str]:
    """Every macro's value for ``conversion``, unencoded ("" for a missing one): the POST body."""
    out = {name: _text(conversion.get(name)) for name in _TEXT_FIELDS}
    out["status"] = _text(conversion.get("status"))
    out["payout"] = _decimal_text(conversion.get("payout"))
    version = conversion.get("version")
    out["version"] = "" if version is None else str(int(version))
    out["event_time"] = _event_time(conversion)
    out["idempotency_key"] = idempotency_key(conversion)
    assert out.keys() == MACROS
    return out


def render(url_template: str, conversion: Mapping[str, Any]) -> str:
    """``url_template`` with every macro replaced by its percent-encoded value for ``conversion``.

    ValueError for a template the loader would refuse (unknown macro, bad braces).
    """
    values = fields(conversion)
    out: list[str] = []
    for literal, name in parse_outbound_url(url_template):
        out.append(literal)
        if name is not None:
            out.append(encode(values[name]))
    return "".join(out)
