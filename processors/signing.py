"""Postback authentication: the signing scheme partners implement, and its verifier.

Pure functions over one recorded request (a ``RawPostback``) and the advertiser's
configuration; no I/O, no clock. The partner-facing specification, with test vectors,
is ``docs/signing.md``; this module (the verifier) and ``postback.signing`` (the
signer: ``canonical_query``, ``sign_query``, ``sign_json``, re-exported here) are its
reference implementation, and the tests check the three agree.

Three ways to authenticate a postback
=====================================

Query/form signing (``mode="hmac"``)
    Parameters ``ts`` (unix seconds), optional ``kid`` (key id) and ``sig``::

        canonical = canonical_query(params)          # every parameter except sig
        sig = hex(HMAC-SHA256(secret, canonical))

    The canonical string is built from the parameters *as sent* (decoded, before any
    alias mapping): each key and value is UTF-8 percent-encoded per RFC 3986 (only
    ``A-Z a-z 0-9 - _ . ~`` stay as they are, ``%XX`` upper-case, space is ``%20``),
    the encoded pairs are sorted by encoded key, then encoded value (plain byte order;
    note: *not* by the joined ``k=v`` text), and joined as ``k=v`` with ``&``. Query
    and form-body parameters are one list (the ingester concatenates them), so the
    signature covers both.

JSON/header signing (``mode="hmac"``)
    Headers ``X-Postback-Timestamp`` (unix seconds), optional ``X-Postback-Key-Id`` and
    ``X-Postback-Signature: v1=<hex>``; ``hex = HMAC-SHA256(secret, b"<ts>." + body)``
    over the raw body bytes. During a key rotation a partner may send several values,
    ``v1=<hex1>,v1=<hex2>``; one matching is enough. Unknown schemes (``v0=...``) are
    ignored.

Token (legacy, ``mode="token"``)
    Parameter ``token`` equal to the advertiser's shared token. It proves who sent the
    request, not what it says; advertisers should move to HMAC.

Renamed auth parameters
    ``ts``, ``kid``, ``sig`` and ``token`` are looked up under the advertiser's aliases
    too (``postback.partner_view``), e.g. ``signature`` for ``sig``; each may be sent once
    under one of its names. The canonical string still uses the names *as sent* and
    leaves out ``sig`` and every alias of it. The token may also come in the
    advertiser's ``token_header``. Details name the parameter as it was sent.

Verification rules (:func:`authenticate`, in this order)
=======================================================

1. ``ip_not_allowed``: the source address is not in the advertiser's ``allow_ips``.
2. Mode: an ``X-Postback-Signature`` header selects header mode (whatever the content
   type); else a ``sig`` parameter query mode; else a ``token`` parameter token mode;
   else ``missing_signature``. A mode the advertiser does not allow is
   ``auth_mode_not_allowed``. A ``ts``/``sig``/``kid``/``token`` parameter sent more
   than once, or a signature header given twice with different values, is
   ``invalid_field`` (we never guess which one was meant).
3. Coverage: everything the pipeline will use must be covered by what was verified.

   - Query mode with a JSON content type is ``missing_signature``: the ingester appends
     the JSON object's pairs to ``params``, so a query signature would have to cover
     fields that were never in the query. JSON bodies are signed with the header.
   - Header mode: the signature covers only the timestamp and the body, so every
     parameter must come from the body (``params`` must be exactly the pairs the
     ingester decoded from the JSON or form body). A parameter from the query string
     is unsigned data: ``missing_signature``. This also rules out header signing of an
     empty body carrying query parameters: such a signature depends only on the
     timestamp, so anyone who saw one request could attach any parameters to it for
     the whole tolerance window, and every such request in the same second would
     share one replay key (distinct conversions dropped as retries).
4. Timestamp (HMAC modes; token mode only when a ``ts`` parameter is present): missing
   is ``missing_signature``, anything but 1-18 ASCII digits is ``invalid_field``, more
   than ``timestamp_tolerance_s`` seconds from ``received_at_ms`` is
   ``stale_timestamp``. Always the ingester's receipt time, never the current time:
   consumer lag or a replay of the topic must never reject a good postback.
5. Key: a key id (``kid`` parameter in query mode, ``X-Postback-Key-Id`` in header mode)
   selects that secret or is ``unknown_key_id``; without one every secret of the
   advertiser is tried (so ``default_key_id`` is not needed here).
6. Compare with :func:`hmac.compare_digest` for every (secret, presented signature)
   pair, without stopping at the first match. A ``sig`` that is not 64 hex digits is
   ``bad_signature`` (either case is accepted); no match is ``bad_signature``. The token
   is compared with :func:`hmac.compare_digest` too (as UTF-8 bytes).
7. Success: :class:`AuthOk` with the mode, the matched key id (``None`` for a token)
   and ``replay_key``.

``replay_key``
    ``sha256`` hex of exactly what was verified: the canonical query string in query
    and token modes (in token mode it includes the token), ``b"<ts>." + body`` in header
    mode. It identifies the *content* of the request, so a retry has the same key
    however it is presented: upper- vs lower-case hex, a different subset or order of
    ``v1=`` values, an added or removed ``X-Postback-Key-Id`` header, or a re-sign with
    the other key during a rotation. (Keying on the presented signature would let a
    captured multi-``v1`` request be replayed once per value.) Downstream dedupe uses it
    only for postbacks that carry neither an order id nor a one-time event.

Parameter order is not signed: the canonical string is sorted. Only the relative order
of repeated keys could carry meaning, and nothing downstream relies on it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote_to_bytes

from postback.signing import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    canonical_query,
    hmac_hex,
    json_message,
    sign_json,
    sign_query,
)

if TYPE_CHECKING:  # only attribute access at run time; keeps this module import-light
    from postback.partners import Advertiser

__all__ = [
    "KEY_ID_HEADER",
    "REASONS",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AuthFailed",
    "AuthOk",
    "authenticate",
    "canonical_query",
    "is_json_content_type",
    "sign_json",
    "sign_query",
]

#: Every ``AuthFailed.reason`` (a subset of the Rejection schema's reasons).
REASONS = frozenset({
    "missing_signature", "bad_signature", "stale_timestamp", "unknown_key_id", "ip_not_allowed",
    "auth_mode_not_allowed", "invalid_field",
})

#: Parameters with a meaning for authentication; each may be sent at most once.
_AUTH_PARAMS = ("ts", "kid", "sig", "token")
#: At most this many ``v1=`` values are checked (a rotation needs two).
MAX_SIGNATURE_VALUES = 8

_TS_RE = re.compile(r"[0-9]{1,18}")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_FORM = "application/x-www-form-urlencoded"
_SHOWN_CHARS = 300  # of a canonical string in a rejection detail


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class AuthOk:
    """The request is authentic.

    ``key_id`` is the id of the secret that matched (``None`` in token mode).
    ``replay_key`` is the sha256 hex of what was verified (see the module docstring):
    equal for retries of the same request, however they are presented.
    """

    mode: Literal["hmac", "token"]
    key_id: str | None
    replay_key: str


@dataclass(frozen=True)
class AuthFailed:
    """The request is not authentic. ``reason`` is one of :data:`REASONS`; ``detail``
    says why in words fit for the partner (never a secret, token or expected signature)."""

    reason: str
    detail: str


# --------------------------------------------------------------------------- helpers


def is_json_content_type(content_type: str | None) -> bool:
    """``application/json`` or any ``+json`` type, parameters (``; charset=``) ignored."""
    mime = _mime(content_type)
    return mime == "application/json" or mime.endswith("+json")


def _mime(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class _JsonPairs(list):  # type: ignore[type-arg]
    """A decoded JSON object as its (key, value) pairs (tells objects from arrays)."""


def _json_pairs(body: bytes) -> list[tuple[str, str]] | None:
    """The pairs the ingester records for a JSON body, or None if it would not accept it.

    Mirrors ``ingest.validation.parse_json_object``: a flat object; strings as they are,
    numbers as their exact source text, booleans as "true"/"false".
    """
    def no_constant(name: str) -> object:
        raise ValueError(name)

    decoder = json.JSONDecoder(object_pairs_hook=_JsonPairs, parse_int=str, parse_float=str,
                               parse_constant=no_constant)
    try:
        obj = decoder.decode(bytes(body).decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    if type(obj) is not _JsonPairs:
        return None
    out: list[tuple[str, str]] = []
    for key, value in obj:
        if type(value) is str:
            out.append((key, value))
        elif value is True or value is False:
            out.append((key, "true" if value else "false"))
        else:
            return None
    return out


def _form_pairs(body: bytes) -> list[tuple[str, str]] | None:
    """The pairs the ingester records for a form body (``parse_urlencoded``), or None."""
    out: list[tuple[str, str]] = []
    for segment in bytes(body).split(b"&"):
        if not segment:
            continue
        raw_key, _, raw_value = segment.partition(b"=")
        try:
            key = unquote_to_bytes(raw_key.replace(b"+", b" ")).decode("utf-8")
            value = unquote_to_bytes(raw_value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            return None
        out.append((key, value))
    return out


def _body_pairs(body: bytes, content_type: str | None) -> list[tuple[str, str]] | None:
    """The parameters the ingester took from the body (empty for an empty or opaque body)."""
    if not body:
        return []
    if is_json_content_type(content_type):
        return _json_pairs(body)
    if _mime(content_type) == _FORM:
        return _form_pairs(body)
    return []


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _show(value: str, limit: int = 64) -> str:
    """A partner-supplied value for a detail message: repr, truncated."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _failed(reason: str, detail: str) -> AuthFailed:
    assert reason in REASONS, reason
    return AuthFailed(reason, detail)


def _timestamp(raw: str | None, where: str, adv: Advertiser, received_at_ms: int) -> AuthFailed | str:
    """The timestamp text when present, well-formed and within tolerance, else why not."""
    if raw is None:
        return _failed("missing_signature", f"{where} is missing: signed requests carry the unix time "
                                            "(seconds) at which they were signed")
    if not _TS_RE.fullmatch(raw):
        return _failed("invalid_field", f"{where} must be unix seconds (1 to 18 digits 0-9), got {_show(raw)}")
    skew_ms = abs(received_at_ms - int(raw) * 1000)
    if skew_ms > adv.timestamp_tolerance_s * 1000:
        return _failed("stale_timestamp",
                       f"{where} {raw} is {skew_ms / 1000:g} s from the time we received the request "
                       f"({received_at_ms // 1000}); at most {adv.timestamp_tolerance_s} s are accepted. "
                       "A request this old must be signed again with the current time; keep your clock in sync")
    return raw


# --------------------------------------------------------------------------- verification


def authenticate(
    adv: Advertiser,
    params: Sequence[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
    content_type: str | None,
    remote_ip: str,
    received_at_ms: int,
) -> AuthOk | AuthFailed:
    """Whether one recorded postback is authentic for ``adv`` (rules: module docstring).

    ``params`` are the recorded parameters in order (query, then form or JSON body
    pairs), ``headers`` the recorded signature headers (names in any case), ``body`` the
    raw body, ``received_at_ms`` the ingester's receipt time. Never raises for any
    request content.
    """
    # 1. source address
    if not adv.ip_allowed(remote_ip):
        return _failed("ip_not_allowed", f"source address {_show(remote_ip)} is not in this advertiser's allow_ips")

    hdrs: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in hdrs and hdrs[low] != value:
            return _failed("invalid_field", f"header {name} was given twice with different values")
        hdrs[low] = value
    pairs = [(k, v) for k, v in params]
    # Auth parameters are found under the advertiser's aliases (``secure`` -> token, ...);
    # what is signed stays the parameters exactly as sent.
    auth: dict[str, list[str]] = {name: [] for name in _AUTH_PARAMS}
    sent_as: dict[str, str] = {}
    for k, v in pairs:
        name = adv.canonical_name(k)
        if name in auth:
            auth[name].append(v)
            sent_as.setdefault(name, k)
    counts = {name: len(values) for name, values in auth.items()}
    header_token = hdrs.get(adv.token_header.lower()) if adv.token_header else None
    if header_token is not None:
        auth["token"].append(header_token)
        counts["token"] += 1
        sent_as.setdefault("token", f"header {adv.token_header}")
    unsigned = {k for k, _ in pairs if adv.canonical_name(k) == "sig"}

    # 2. mode
    sig_header = hdrs.get(SIGNATURE_HEADER.lower())
    if sig_header is not None:
        mode = "header"
    elif counts["sig"]:
        mode = "query"
    elif counts["token"]:
        mode = "token"
    else:
        names = sorted({f"{k} (alias of {adv.aliases[k]})" for k in adv.aliases if adv.aliases[k] in ("sig", "token")})
        also = f" ({', '.join(names)})" if names else ""
        header = f", {adv.token_header} header" if adv.token_header else ""
        return _failed("missing_signature",
                       f"no {SIGNATURE_HEADER} header, sig parameter or token parameter{header}{also}")
    wanted = "token" if mode == "token" else "hmac"
    if wanted not in adv.auth_modes:
        how = {"header": f"an {SIGNATURE_HEADER} header", "query": "a sig parameter",
               "token": "a token parameter"}[mode]
        allowed = ", ".join(adv.auth_modes) or "none"
        return _failed("auth_mode_not_allowed",
                       f"the request authenticates with {how} ({wanted}), which this advertiser may not use "
                       f"(allowed: {allowed})")
    if mode != "header":
        for name in (("ts", "kid", "sig") if mode == "query" else ("ts", "token")):
            if counts[name] > 1:
                return _failed("invalid_field", f"parameter {name} (under its own name or an alias, or as a "
                                                f"header) was sent {counts[name]} times; send it once")

    # 3. coverage
    if mode == "query" and is_json_content_type(content_type):
        return _failed("missing_signature", "JSON bodies are signed with the X-Postback-Signature header")
    if mode == "header" and pairs:
        from_body = _body_pairs(body, content_type)
        if from_body != pairs:
            outside = len(pairs) - len(from_body or [])
            what = (f"{outside} parameter(s)" if from_body is not None and outside > 0
                    and pairs[outside:] == from_body else "parameters")
            return _failed("missing_signature",
                           f"{what} outside the request body (e.g. in the query string) are not covered by "
                           f"{SIGNATURE_HEADER}, which signs only the timestamp and the body: send every "
                           "field in the body, or sign the query with ts/sig instead")

    # 4. timestamp
    if mode == "header":
        raw_ts = hdrs.get(TIMESTAMP_HEADER.lower())
        checked = _timestamp(None if raw_ts is None else raw_ts.strip(" \t"), f"header {TIMESTAMP_HEADER}",
                             adv, received_at_ms)
    elif mode == "query" or counts["ts"]:
        raw_ts = auth["ts"][0] if auth["ts"] else None
        checked = _timestamp(raw_ts, f"parameter {sent_as.get('ts', 'ts')}", adv, received_at_ms)
    else:
        checked = ""
    if isinstance(checked, AuthFailed):
        return checked

    # token mode: 5-7
    if mode == "token":
        token = auth["token"][0]
        ok = hmac.compare_digest(token.encode("utf-8", "surrogatepass"),
                                 (adv.token or "").encode("utf-8", "surrogatepass"))
        if not ok or adv.token is None:
            return _failed("bad_signature", f"the token ({sent_as['token']}) does not match this advertiser's token")
        try:
            canonical = canonical_query(pairs, unsigned)
        except UnicodeEncodeError:
            return _failed("invalid_field", "a parameter is not valid UTF-8")
        return AuthOk("token", None, _sha256_hex(canonical.encode("ascii")))

    # 5. key selection
    if mode == "header":
        raw_kid = hdrs.get(KEY_ID_HEADER.lower())
        kid = None if raw_kid is None else raw_kid.strip(" \t")
        kid_where = f"header {KEY_ID_HEADER}"
    else:
        kid = auth["kid"][0] if auth["kid"] else None
        kid_where = f"parameter {sent_as.get('kid', 'kid')}"
    if kid is not None:
        secret = adv.secrets.get(kid)
        if secret is None:
            return _failed("unknown_key_id", f"{kid_where} {_show(kid)} is not a key of this advertiser")
        candidates = [(kid, secret)]
    else:
        candidates = list(adv.secrets.items())
        if not candidates:
            return _failed("unknown_key_id", "this advertiser has no HMAC keys configured")

    # 6. compare
    if mode == "header":
        values: list[str] = []
        for item in sig_header.split(","):  # type: ignore[union-attr]
            scheme, eq, value = item.strip(" \t").partition("=")
            if eq and scheme == "v1":
                values.append(value.strip(" \t"))
        if not values:
            return _failed("missing_signature", f"{SIGNATURE_HEADER} has no v1=<hex> value")
        if len(values) > MAX_SIGNATURE_VALUES:
            return _failed("invalid_field", f"{SIGNATURE_HEADER} has {len(values)} v1 values; "
                                            f"at most {MAX_SIGNATURE_VALUES} are checked")
        presented = [v.lower() for v in values if _HEX64_RE.fullmatch(v)]
        if not presented:
            return _failed("bad_signature", f"no v1 value in {SIGNATURE_HEADER} is 64 hexadecimal digits")
        message = json_message(checked, body)
        shown = ""
    else:
        sig = auth["sig"][0]
        if not _HEX64_RE.fullmatch(sig):
            return _failed("bad_signature", f"parameter {sent_as['sig']} must be 64 hexadecimal digits "
                                            "(HMAC-SHA256 of the canonical string, in hex)")
        presented = [sig.lower()]
        try:
            canonical = canonical_query(pairs, unsigned)
        except UnicodeEncodeError:
            return _failed("invalid_field", "a parameter is not valid UTF-8")
        message = canonical.encode("ascii")
        cut = canonical if len(canonical) <= _SHOWN_CHARS else canonical[:_SHOWN_CHARS] + "..."
        shown = f"; the canonical string we signed is {cut!r}"
    matched: str | None = None
    for key_id, secret in candidates:
        expected = hmac_hex(secret, message).encode("ascii")
        for value in presented:  # every pair is compared: no early exit
            if hmac.compare_digest(expected, value.encode("ascii")) and matched is None:
                matched = key_id
    if matched is None:
        tried = ", ".join(k for k, _ in candidates)
        return _failed("bad_signature", f"the signature does not match (key ids tried: {tried}){shown}")

    # 7. success
    return AuthOk("hmac", matched, _sha256_hex(message))
