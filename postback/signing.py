"""Partner-side signing: what an advertiser's server does before it sends a postback.

The scheme is specified, with test vectors, in ``docs/signing.md``; the verifier is
``processors.signing.authenticate``. This module holds only what a sender needs (the
canonical query string, ``sign_query`` for query/form postbacks, ``sign_json`` for JSON
bodies signed in headers), so tools that sign (``postback sign``, ``postback demo``,
benchmarks, partner integrations) do not depend on the verifier.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Container, Iterable, Sequence
from urllib.parse import quote

__all__ = [
    "KEY_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "canonical_query",
    "hmac_hex",
    "json_message",
    "sign_json",
    "sign_query",
]

SIGNATURE_HEADER = "X-Postback-Signature"
TIMESTAMP_HEADER = "X-Postback-Timestamp"
KEY_ID_HEADER = "X-Postback-Key-Id"

#: Characters RFC 3986 calls unreserved; ``quote`` never encodes A-Z a-z 0-9 either.
_UNRESERVED = "-_.~"


def encode(s: str) -> str:
    """``s`` percent-encoded per RFC 3986: UTF-8, upper-case hex, only ``A-Z a-z 0-9 - _ . ~`` kept.

    The encoding of the canonical string; outbound URL templates use it too, so a value
    reads the same in a signed request and in its URL. Raises UnicodeEncodeError (a
    ValueError) for lone surrogates: not valid UTF-8.
    """
    return quote(s, safe=_UNRESERVED, encoding="utf-8", errors="strict")


def canonical_query(params: Iterable[tuple[str, str]], unsigned: Container[str] = ("sig",)) -> str:
    """The string a query/form signature covers.

    Every parameter except the signature itself (``sig``, or the names in ``unsigned``:
    an advertiser's alias for ``sig``), under the names and with the values as sent;
    key and value UTF-8 percent-encoded per RFC 3986 (only ``A-Z a-z 0-9 - _ . ~``
    left as they are); pairs sorted by encoded key, then encoded value; joined as
    ``k=v`` with ``&``. Duplicates are kept.
    """
    pairs = sorted((encode(k), encode(v)) for k, v in params if k not in unsigned)
    return "&".join(f"{k}={v}" for k, v in pairs)


def hmac_hex(secret: str, message: bytes) -> str:
    """Lower-case hex HMAC-SHA256 of ``message`` under ``secret`` (UTF-8)."""
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def _check_ts(ts: int) -> str:
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise ValueError(f"ts must be a non-negative integer (unix seconds), got {ts!r}")
    return str(ts)


def sign_query(params: Sequence[tuple[str, str]], secret: str, ts: int,
               kid: str | None = None) -> list[tuple[str, str]]:
    """``params`` with ``ts`` (and ``kid``) and then ``sig`` appended, ready to send.

    Send the result as the query string (or form body) percent-encoded any way you like;
    the canonical string does not depend on how the wire encoding was done.
    """
    for k, _ in params:
        if k in ("ts", "kid", "sig"):
            raise ValueError(f"params already contain {k!r}; it is added by sign_query")
    signed = [(k, v) for k, v in params] + [("ts", _check_ts(ts))]
    if kid is not None:
        signed.append(("kid", kid))
    signed.append(("sig", hmac_hex(secret, canonical_query(signed).encode("ascii"))))
    return signed


def json_message(ts: str, body: bytes) -> bytes:
    """What a header signature covers: ``b"<ts>." + body``."""
    return ts.encode("ascii") + b"." + bytes(body)


def sign_json(body: bytes, secrets: Sequence[str] | str, ts: int,
              kid: str | None = None) -> dict[str, str]:
    """The headers that sign a (JSON) ``body``: timestamp, key id and ``v1=`` signatures.

    Several secrets give several ``v1=`` values (use this while a key is rotated and you
    do not know which key the receiver has yet). ``kid`` names the one key used, so it
    may only be given with a single secret.
    """
    secret_list = [secrets] if isinstance(secrets, str) else list(secrets)
    if not secret_list:
        raise ValueError("at least one secret is required")
    if kid is not None and len(secret_list) != 1:
        raise ValueError("kid names one key: give it with exactly one secret "
                         "(with several secrets, send no key id and let the receiver try its keys)")
    ts_s = _check_ts(ts)
    message = json_message(ts_s, body)
    headers = {TIMESTAMP_HEADER: ts_s}
    if kid is not None:
        headers[KEY_ID_HEADER] = kid
    headers[SIGNATURE_HEADER] = ",".join(f"v1={hmac_hex(s, message)}" for s in secret_list)
    return headers
