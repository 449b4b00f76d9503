"""Input validation for the ingester: turn raw request bytes into checked parameters.

Why this module exists: advertisers and affiliates send whatever their systems produce,
and the ingester sits on the hot path (~10k requests/s). Everything here is pure logic
(no I/O, no aiohttp) so the HTTP layer can map `RejectedInput` to a 400 with a typed,
machine-readable error list, and so every rule is unit-testable in isolation.

Guarantees:

- The parsers either return checked data or raise `RejectedInput`; for any input they
  raise nothing else (no `UnicodeDecodeError`, `RecursionError`, `KeyError`...).
- Every `FieldError.reason` is one of `REASONS`. At most `MAX_ERRORS` errors are
  reported, so a hostile request cannot make the error response large.
- A `field` echoes a key only when that key is itself valid (short, `[A-Za-z0-9_.-[]]`);
  an invalid key is reported under its container (`"query"`, `"body"` or `"line"`), so
  the response never echoes attacker-chosen bytes.
- Parameters keep the order in which they were sent; numbers from JSON keep their exact
  source text (`"19.990"` stays `"19.990"`): money never goes through `float`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from urllib.parse import unquote_to_bytes

from postback.partner_view import SINGLETON_PARAMS, PartnerView, read
from postback.partners import Advertiser

REASONS = frozenset({
    "missing", "empty", "too_long", "invalid_utf8", "invalid_percent_encoding", "nul_byte",
    "control_character", "invalid_key", "too_many_parameters", "duplicate", "invalid_json", "not_object",
    "not_flat", "invalid_type", "invalid_value", "invalid_click_id",
})

#: Cap on the errors one `RejectedInput` carries (the rest are dropped).
MAX_ERRORS = 20

Params = list[tuple[str, str]]


@dataclass(frozen=True)
class FieldError:
    """One reason an input was rejected: which field, and a code from `REASONS`."""

    field: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason}


class RejectedInput(ValueError):
    """The input is malformed; `errors` says why (at most `MAX_ERRORS` entries).

    A `ValueError` so generic handlers treat it as bad input, never as a server fault.
    """

    def __init__(self, errors: Iterable[FieldError]) -> None:
        self.errors: list[FieldError] = list(errors)[:MAX_ERRORS]
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "rejected input: " + "; ".join(f"{e.field}: {e.reason}" for e in self.errors)


@dataclass(frozen=True)
class Limits:
    """Size limits for one request. `max_body_bytes` is enforced by the HTTP layer (413);
    it lives here so there is one place that defines every limit."""

    max_params: int = 64
    max_key_bytes: int = 64
    max_value_bytes: int = 2048
    max_body_bytes: int = 65536


_LIMITS = Limits()

_KEY = re.compile(r"[A-Za-z0-9_.\-\[\]]+")
# C0 controls except TAB, plus lone surrogates (only reachable via JSON "\ud800" escapes).
_BAD_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\ud800-\udfff]")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CLICK_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _chars_reason(s: str) -> str | None:
    """nul_byte / control_character / invalid_utf8 (lone surrogate), or None if clean."""
    m = _BAD_CHARS.search(s)
    if m is None:
        return None
    if "\x00" in s:
        return "nul_byte"
    return "control_character" if m.group() < "\ud800" else "invalid_utf8"


def _key_reason(key: str, max_bytes: int) -> str | None:
    if len(key) <= max_bytes and _KEY.fullmatch(key):  # ASCII only, so chars == bytes
        return None
    return _chars_reason(key) or "invalid_key"


def _text_reason(s: str, max_bytes: int) -> str | None:
    """Reason a decoded string value is unacceptable, or None."""
    reason = _chars_reason(s)
    if reason:
        return reason
    n = len(s)
    if n > max_bytes or (n * 4 > max_bytes and len(s.encode("utf-8")) > max_bytes):
        return "too_long"
    return None


def _unquote(part: bytes) -> bytes | None:
    """Form-decode one key or value; None when a '%' is not followed by two hex digits."""
    if b"+" in part:
        part = part.replace(b"+", b" ")
    if b"%" not in part:
        return part
    if _BAD_PERCENT.search(part):
        return None
    return unquote_to_bytes(part)


def _too_many(container: str) -> RejectedInput:
    return RejectedInput([FieldError(container, "too_many_parameters")])


def parse_urlencoded(raw: bytes | str, limits: Limits = _LIMITS) -> Params:
    """Parse a raw query string (still percent-encoded, without '?') or a form body.

    Pass the query *as sent* (`request.rel_url.raw_query_string`), not aiohttp's decoded
    one, or strict percent/UTF-8 checks cannot apply. Returns pairs in sent order with
    duplicates kept; raises `RejectedInput` listing every problem found. The parameter
    count is checked before any decoding so a huge count is rejected cheaply.
    Key problems are reported under field "query"; value problems under the key.
    """
    sep = "&" if isinstance(raw, str) else b"&"
    if raw.count(sep) >= limits.max_params:  # count+1 bounds the segments; count exactly
        segments = raw.split(sep)
        if len(segments) - segments.count(sep[:0]) > limits.max_params:
            raise _too_many("query")
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    max_key, max_value = limits.max_key_bytes, limits.max_value_bytes
    out: Params = []
    errors: list[FieldError] = []
    for segment in data.split(b"&"):
        if not segment:
            continue
        raw_key, _, raw_value = segment.partition(b"=")
        key = ""
        key_bytes = _unquote(raw_key)
        if key_bytes is None:
            reason: str | None = "invalid_percent_encoding"
        else:
            try:
                key = key_bytes.decode("utf-8")
            except UnicodeDecodeError:
                reason = "invalid_utf8"
            else:
                reason = _key_reason(key, max_key)
        name = key
        if reason:
            errors.append(FieldError("query", reason))
            name = "query"
        value = ""
        value_bytes = _unquote(raw_value)
        if value_bytes is None:
            reason = "invalid_percent_encoding"
        else:
            try:
                value = value_bytes.decode("utf-8")
            except UnicodeDecodeError:
                reason = "invalid_utf8"
            else:
                reason = _chars_reason(value) or ("too_long" if len(value_bytes) > max_value else None)
        if reason:
            errors.append(FieldError(name, reason))
        if errors:
            if len(errors) >= MAX_ERRORS:
                break
            continue
        out.append((key, value))
    if errors:
        raise RejectedInput(errors)
    return out


# -- JSON -------------------------------------------------------------------------------
class _Obj(dict):  # type: ignore[type-arg]
    """A decoded JSON object that remembers which keys it saw more than once."""

    dups: tuple[str, ...] = ()


class _JsonNumber(str):
    """A JSON number kept as its exact source text (bulk clicks tell numbers from strings)."""

    __slots__ = ()


class _BadConstant(ValueError):
    pass


def _object_pairs(pairs: list[tuple[str, object]]) -> _Obj:
    obj = _Obj(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dups: list[str] = []
        for k, _ in pairs:
            if k in seen and k not in dups:
                dups.append(k)
            seen.add(k)
        obj.dups = tuple(dups)
    return obj


def _reject_constant(name: str) -> object:
    raise _BadConstant(name)


_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_float=str, parse_int=str,
                            parse_constant=_reject_constant)
_BULK_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_float=_JsonNumber,
                                 parse_int=_JsonNumber, parse_constant=_reject_constant)


def _decode_json(decoder: json.JSONDecoder, text: str, container: str) -> object:
    """Decode or raise RejectedInput. Deep nesting hits the recursion limit in the C
    scanner; that is reported as not_flat instead of escaping as RecursionError."""
    try:
        return decoder.decode(text)
    except RecursionError:
        raise RejectedInput([FieldError(container, "not_flat")]) from None
    except ValueError:  # JSONDecodeError, NaN/Infinity
        raise RejectedInput([FieldError(container, "invalid_json")]) from None


def _utf8(body: bytes) -> str:
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise RejectedInput([FieldError("body", "invalid_utf8")]) from None


def parse_json_object(body: bytes, limits: Limits = _LIMITS) -> Params:
    """Parse a JSON postback body: one flat object of string/number/bool values.

    Returns (key, value) pairs in document order; numbers keep their exact text, bools
    become "true"/"false". Nested values and null are not_flat; duplicate keys are
    duplicate. Same key/value/count limits as `parse_urlencoded`, container "body".
    """
    obj = _decode_json(_DECODER, _utf8(body), "body")
    if type(obj) is not _Obj:
        raise RejectedInput([FieldError("body", "not_object")])
    if len(obj) > limits.max_params:
        raise _too_many("body")
    max_key, max_value = limits.max_key_bytes, limits.max_value_bytes
    errors = [FieldError(k if _key_reason(k, max_key) is None else "body", "duplicate") for k in obj.dups]
    out: Params = []
    for key, value in obj.items():
        key_reason = _key_reason(key, max_key)
        name = key
        if key_reason:
            errors.append(FieldError("body", key_reason))
            name = "body"
        if type(value) is str:
            reason = _text_reason(value, max_value)
        elif value is True or value is False:
            value, reason = ("true" if value else "false"), None
        else:  # object, array or null
            reason = "not_flat"
        if reason:
            errors.append(FieldError(name, reason))
        if errors:
            if len(errors) >= MAX_ERRORS:
                break
            continue
        out.append((key, value))  # type: ignore[arg-type]
    if errors:
        raise RejectedInput(errors)
    return out


# -- postbacks --------------------------------------------------------------------------
#: Canonical names sent at most once (after aliases); kept here for callers of this module.
SINGLETON_FIELDS = SINGLETON_PARAMS


def first(params: Params, key: str) -> str | None:
    """The first value sent for `key`, or None when it was not sent."""
    for k, v in params:
        if k == key:
            return v
    return None


def _required(name: str, value: str | None, errors: list[FieldError]) -> bool:
    """Append missing/empty for a required field; True when it has a non-blank value."""
    if value is None:
        errors.append(FieldError(name, "missing"))
    elif not value.strip():
        errors.append(FieldError(name, "empty"))
    else:
        return True
    return False


def check_postback(params: Params, adv: Advertiser | None = None) -> PartnerView:
    """Reject a postback whose meaning would be ambiguous or unroutable; else its aliased view.

    Every check reads the advertiser's aliased view (`postback.partner_view.read`), the
    same one the processor reads: advertiser_id (always literal) and event (under any
    alias, or from the advertiser's defaults) are required, blank counts as empty; a
    singleton field sent twice under any of its names is a duplicate (we never guess
    which value the advertiser meant); click_id must look like one of ours. `adv` is
    None for an advertiser we do not know (no aliases; the processor rejects it).
    Raises RejectedInput with every problem.
    """
    errors: list[FieldError] = []
    view = read(params, adv)
    _required("advertiser_id", first(params, "advertiser_id"), errors)
    _required("event", view.get("event"), errors)
    errors.extend(FieldError(k, "duplicate") for k in view.repeated)
    click_id = view.get("click_id")
    if click_id is not None and not _CLICK_ID.fullmatch(click_id):
        errors.append(FieldError("click_id", "invalid_click_id"))
    if errors:
        raise RejectedInput(errors)
    return view


# -- clicks -----------------------------------------------------------------------------
CLICK_FIELDS = ("offer_id", "affiliate_id", "campaign_id", "sub1", "sub2", "sub3", "sub4", "sub5")
_CLICK_SET = frozenset(CLICK_FIELDS)
_SUBS = CLICK_FIELDS[3:]
Subs = tuple[str | None, str | None, str | None, str | None, str | None]


@dataclass(frozen=True)
class ClickInput:
    """A checked click: ids match `[A-Za-z0-9_.-]{1,64}`; empty optional fields are None."""

    offer_id: str
    affiliate_id: str
    campaign_id: str | None
    subs: Subs
    extras: list[tuple[str, str]]
    click_id: str | None = None
    clicked_at_ms: int | None = None
    ip: str | None = None
    user_agent: str | None = None
    referer: str | None = None


def _click_core(values: dict[str, str], errors: list[FieldError]) -> tuple[str, str, str | None, Subs]:
    """Check the id fields shared by GET /click and bulk import; append errors."""
    ids: list[str] = []
    for name in ("offer_id", "affiliate_id"):
        value = values.get(name)
        if _required(name, value, errors) and not _ID.fullmatch(value):  # type: ignore[arg-type]
            errors.append(FieldError(name, "invalid_value"))
        ids.append(value or "")
    campaign = values.get("campaign_id") or None
    if campaign is not None and not _ID.fullmatch(campaign):
        errors.append(FieldError("campaign_id", "invalid_value"))
    subs: Subs = tuple(values.get(s) or None for s in _SUBS)  # type: ignore[assignment]
    return ids[0], ids[1], campaign, subs


def click_from_params(params: Params) -> ClickInput:
    """Build a click from GET /click parameters (already through `parse_urlencoded`).

    offer_id and affiliate_id are required; each CLICK_FIELDS key may appear once;
    every other parameter is kept in `extras`, in order. Raises RejectedInput.
    """
    errors: list[FieldError] = []
    values: dict[str, str] = {}
    extras: list[tuple[str, str]] = []
    for k, v in params:
        if k in _CLICK_SET:
            if k not in values:
                values[k] = v
            elif FieldError(k, "duplicate") not in errors:  # at most 8 entries
                errors.append(FieldError(k, "duplicate"))
        else:
            extras.append((k, v))
    offer, affiliate, campaign, subs = _click_core(values, errors)
    if errors:
        raise RejectedInput(errors)
    return ClickInput(offer, affiliate, campaign, subs, extras)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_MS_THRESHOLD = 10**11  # a number above this is already milliseconds (1e11 s is year 5138)
_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z


def _clicked_at_ms(value: object) -> int | None:
    """Unix seconds, unix ms (> 1e11) or ISO-8601 with offset -> ms; None if invalid."""
    t = type(value)
    if t is int:
        number: Decimal = Decimal(value)  # type: ignore[arg-type]
    elif t is float or t is _JsonNumber:
        if t is float and not math.isfinite(value):  # type: ignore[arg-type]
            return None
        try:
            number = Decimal(repr(value) if t is float else value)  # type: ignore[arg-type]
        except InvalidOperation:
            return None
    elif t is str:
        if len(value) > 64:  # type: ignore[arg-type]
            return None
        try:
            moment = datetime.fromisoformat(value)  # type: ignore[arg-type]
            if moment.tzinfo is None:
                return None
            ms = (moment - _EPOCH) // _MS
        except (ValueError, OverflowError):
            return None
        return ms if 0 <= ms <= _MAX_MS else None
    else:  # bool, None, containers
        return None
    if not (number.is_finite() and 0 <= number <= _MAX_MS):  # checked before any int() of 1e999999
        return None
    if number <= _MS_THRESHOLD:
        number *= 1000
    return int(number.to_integral_value(rounding=ROUND_FLOOR))


def _scalar_text(value: object) -> str | None:
    """The text of a JSON scalar (numbers exact, bools true/false); None if not scalar."""
    if isinstance(value, str):
        return str(value)
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    if type(value) is float and math.isfinite(value):  # type: ignore[arg-type]
        return repr(value)
    return None


def click_from_json(obj: object, limits: Limits = _LIMITS) -> ClickInput:
    """Build a click from one decoded bulk-import object.

    Same id rules as `click_from_params`, plus optional click_id, clicked_at, ip,
    user_agent, referer. null means absent; nested values are not_flat; other scalar
    keys go to `extras` as text. Key problems are reported under field "line".
    Raises RejectedInput.
    """
    if not isinstance(obj, dict):
        raise RejectedInput([FieldError("line", "not_object")])
    if len(obj) > limits.max_params:
        raise _too_many("line")
    max_key, max_value = limits.max_key_bytes, limits.max_value_bytes
    errors = [FieldError(k, "duplicate") for k in getattr(obj, "dups", ()) if _key_reason(k, max_key) is None]
    values: dict[str, str] = {}
    extras: list[tuple[str, str]] = []
    optional: dict[str, str] = {}
    clicked_at_ms: int | None = None
    for key, value in obj.items():
        if type(key) is not str or (reason := _key_reason(key, max_key)):
            errors.append(FieldError("line", "invalid_key" if type(key) is not str else reason))  # type: ignore[arg-type]
        elif value is None:
            continue
        elif isinstance(value, (dict, list, tuple)):
            errors.append(FieldError(key, "not_flat"))
        elif key == "clicked_at":
            clicked_at_ms = _clicked_at_ms(value)
            if clicked_at_ms is None:
                errors.append(FieldError(key, "invalid_value"))
        elif key in ("ip", "user_agent", "referer") and type(value) is not str:
            errors.append(FieldError(key, "invalid_type"))
        elif (key in _CLICK_SET or key == "click_id") and (value is True or value is False):
            errors.append(FieldError(key, "invalid_type"))
        elif (text := _scalar_text(value)) is None:
            errors.append(FieldError(key, "invalid_type"))
        elif reason := _text_reason(text, max_value):
            errors.append(FieldError(key, reason))
        elif key in _CLICK_SET:
            values[key] = text
        elif key in ("click_id", "ip", "user_agent", "referer"):
            if key == "click_id" and not _CLICK_ID.fullmatch(text):
                errors.append(FieldError(key, "invalid_click_id"))
            optional[key] = text or None  # type: ignore[assignment]
        else:
            extras.append((key, text))
        if len(errors) >= MAX_ERRORS:
            break
    offer, affiliate, campaign, subs = _click_core(values, errors)
    if errors:
        raise RejectedInput(errors)
    return ClickInput(offer, affiliate, campaign, subs, extras, optional.get("click_id"), clicked_at_ms,  # type: ignore[arg-type]
                      optional.get("ip"), optional.get("user_agent"), optional.get("referer"))


_JSON_TYPES = frozenset({"application/json"})
_LINES_TYPES = frozenset({"application/x-ndjson", "application/jsonl"})


def parse_bulk_clicks(body: bytes, content_type: str, limits: Limits = _LIMITS,
                      max_lines: int = 10000) -> tuple[list[tuple[int, ClickInput]], list[dict]]:  # type: ignore[type-arg]
    """Parse a bulk click import: a JSON array of objects, or NDJSON/JSONL lines.

    Whole-body problems (bad UTF-8, unknown content type, unparsable or non-array JSON,
    more than `max_lines` items) raise RejectedInput with field "body"/"content_type".
    Otherwise bad items do not spoil good ones: returns (accepted [(line, click)],
    errors [{"line", "field", "reason"}]), line numbers 1-based (the array index + 1 for
    JSON arrays, the physical line for NDJSON, where blank lines are skipped).
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in _JSON_TYPES and media not in _LINES_TYPES:
        raise RejectedInput([FieldError("content_type", "invalid_value")])
    text = _utf8(body)
    accepted: list[tuple[int, ClickInput]] = []
    errors: list[dict] = []  # type: ignore[type-arg]

    def take(number: int, item: object) -> None:
        try:
            accepted.append((number, click_from_json(item, limits)))
        except RejectedInput as exc:
            errors.extend({"line": number, **e.as_dict()} for e in exc.errors)

    if media in _JSON_TYPES:
        doc = _decode_json(_BULK_DECODER, text, "body")
        if type(doc) is not list:
            raise RejectedInput([FieldError("body", "not_object")])
        if len(doc) > max_lines:
            raise _too_many("body")
        for number, item in enumerate(doc, 1):
            take(number, item)
        return accepted, errors
    lines = text.split("\n")  # not splitlines(): U+2028 etc. are legal inside JSON strings
    if len(lines) > max_lines and sum(1 for ln in lines if ln.strip()) > max_lines:
        raise _too_many("body")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = _decode_json(_BULK_DECODER, line, "line")
        except RejectedInput as exc:  # one bad line does not spoil the others
            errors.extend({"line": number, **e.as_dict()} for e in exc.errors)
        else:
            take(number, item)
    return accepted, errors
