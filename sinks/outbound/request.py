"""One outbound postback request, built from an endpoint and a conversion, signed, with a loggable URL.

- GET: the endpoint's URL with its macros rendered (``sinks.outbound.template``). With a
  ``secret``, ``ts`` and then ``sig`` are appended to the query: the query signing of
  docs/signing.md over every query parameter as the receiver decodes it.
- POST: the rendered URL, and a JSON object of every macro's value (``fields``) as the
  body: sorted keys, compact, UTF-8, ``Content-Type: application/json``. With a
  ``secret``, the ``X-Postback-Timestamp`` and ``X-Postback-Signature`` headers of the
  header signing over that body. That signature covers the body only, not the URL's
  query (the body already carries every macro's value), so a signed POST endpoint's
  URL is best written without a query.

Every request carries ``Idempotency-Key: <conversion_id>:<version>`` and
``User-Agent: postback-pipeline/<version>``. A fragment is not sent.

``url`` is already percent-encoded: send it as it is (``yarl.URL(url, encoded=True)``),
because re-encoding could change what was signed. ``redacted_url`` is the URL with the
values of secret-like query parameters (``sig``, ``token``, ``api_key``, ...) and any
user info replaced by ``REDACTED``: the only form of the URL to log or record. The
endpoint's secret never appears in it, nor in an exception raised here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

from postback import __version__
from postback.partner_model import OutboundEndpoint
from postback.signing import sign_json, sign_query
from sinks.outbound.template import encode, fields, idempotency_key, render

__all__ = ["IDEMPOTENCY_HEADER", "REDACTED", "SECRET_PARAMS", "USER_AGENT", "OutboundRequest",
           "build_request", "redact"]

IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = f"postback-pipeline/{__version__}"
REDACTED = "REDACTED"
#: Query parameter names whose values are never logged (compared lower-case, "-" as "_").
SECRET_PARAMS: frozenset[str] = frozenset({
    "sig", "signature", "token", "secret", "key", "api_key", "apikey", "password", "pass", "auth",
})
#: A parameter ending in one of these (``access_token``, ``client_secret``) is secret too.
_SECRET_SUFFIXES = ("_token", "_secret", "_signature", "_sig", "_password", "_apikey", "_api_key")


@dataclass(frozen=True)
class OutboundRequest:
    """What to send: method, encoded URL, headers and body (None for GET), and the URL to log."""

    method: str
    url: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    body: bytes | None = field(repr=False)
    redacted_url: str

    def __repr__(self) -> str:  # never the URL or headers: they may carry a signature
        return f"OutboundRequest(method={self.method!r}, redacted_url={self.redacted_url!r})"


def _is_secret_param(name: str) -> bool:
    key = name.strip().lower().replace("-", "_")
    return key in SECRET_PARAMS or key.endswith(_SECRET_SUFFIXES)


def redact(url: str) -> str:
    """``url`` with secret-like query parameter values and user info replaced by ``REDACTED``.

    Parameter names and every other value keep their encoding; the fragment is dropped.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    out = []
    for piece in parts.query.split("&") if parts.query else []:
        name, eq, _ = piece.partition("=")
        if _is_secret_param(unquote_plus(name)):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(piece)
    return urlunsplit((parts.scheme, netloc, parts.path, "&".join(out), ""))


def _signed_get_url(rendered: str, secret: str, now_s: int) -> str:
    parts = urlsplit(rendered)
    # The receiver decodes the query the same way (``+`` is a space), so the canonical
    # string computed here is the one it recomputes.
    params = parse_qsl(parts.query, keep_blank_values=True)
    signed = sign_query(params, secret, now_s)
    tail = "&".join(f"{encode(k)}={encode(v)}" for k, v in signed[len(params):])
    query = f"{parts.query}&{tail}" if parts.query else tail
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def build_request(endpoint: OutboundEndpoint, conversion: Mapping[str, Any], now_s: int) -> OutboundRequest:
    """The request that delivers ``conversion`` to ``endpoint``, signed at unix time ``now_s``.

    ValueError when the conversion cannot fill the template (no conversion_id/version)
    or the endpoint is not usable; the message never contains the secret.
    """
    key = idempotency_key(conversion)
    headers = {IDEMPOTENCY_HEADER: key, "User-Agent": USER_AGENT}
    rendered = render(endpoint.url, conversion)
    body: bytes | None = None
    if endpoint.method == "GET":
        url = urlunsplit(urlsplit(rendered)._replace(fragment=""))
        if endpoint.secret is not None:
            try:
                url = _signed_get_url(rendered, endpoint.secret, now_s)
            except ValueError as e:  # sign_query's messages name parameters, never the secret
                raise ValueError(f"{endpoint.endpoint_id}: cannot sign the request: {e}") from None
    elif endpoint.method == "POST":
        url = urlunsplit(urlsplit(rendered)._replace(fragment=""))
        body = json.dumps(fields(conversion), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
        headers["Content-Type"] = "application/json"
        if endpoint.secret is not None:
            try:
                headers.update(sign_json(body, endpoint.secret, now_s))
            except ValueError as e:
                raise ValueError(f"{endpoint.endpoint_id}: cannot sign the request: {e}") from None
    else:
        raise ValueError(f"{endpoint.endpoint_id}: unsupported method {endpoint.method!r}")
    return OutboundRequest(method=endpoint.method, url=url, headers=headers, body=body,
                           redacted_url=redact(url))
