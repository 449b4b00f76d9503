"""Offer landing URL templates: checked when the partner file is loaded, filled in per click.

A template is an absolute http(s) URL with placeholders ({click_id} {offer_id}
{affiliate_id} {campaign_id} {sub1}..{sub5}) after the host; each is replaced by its
value percent-encoded with ``quote(value, safe="")``, so a value can never add path
segments, query parameters or a fragment. Write a literal brace as {{ or }}.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

__all__ = ["LANDING_PLACEHOLDERS", "check_template", "parse_template", "render_template"]

#: Placeholders allowed in an offer's landing URL.
LANDING_PLACEHOLDERS: tuple[str, ...] = (
    "click_id", "offer_id", "affiliate_id", "campaign_id", "sub1", "sub2", "sub3", "sub4", "sub5",
)

# Stands in for placeholders while the URL's scheme and host are checked; a private-use
# character cannot occur in the template because control/space/non-ASCII is rejected.
_MARK = "\ue000"


def parse_template(url: str) -> list[tuple[str, str | None]]:
    """Split a landing URL template into (literal, placeholder-or-None) pieces.

    Raises ValueError with a readable reason for malformed braces, positional or
    unknown placeholders, and format specs or conversions.
    """
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in string.Formatter().parse(url):
        if name is None:
            pieces.append((literal, None))
            continue
        if name == "" or name.isdigit():
            raise ValueError("empty or positional placeholder '{}'; use a named placeholder")
        if name not in LANDING_PLACEHOLDERS:
            raise ValueError(
                f"unknown placeholder {{{name}}}; allowed: "
                + " ".join(f"{{{p}}}" for p in LANDING_PLACEHOLDERS))
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} may not have a format spec or conversion")
        pieces.append((literal, name))
    return pieces


def check_template(url: str) -> None:
    """Raise ValueError, with a reason fit for a load error, unless ``url`` is a usable template."""
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in url):
        raise ValueError("must not contain whitespace, control or non-ASCII characters "
                         "(percent-encode them)")
    pieces = parse_template(url)
    sample = "".join(lit + (_MARK if name else "") for lit, name in pieces)
    parts = urlsplit(sample)
    if _MARK in parts.scheme or _MARK in parts.netloc:
        raise ValueError("placeholders are only allowed after the host "
                         "(in the path, query or fragment)")
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"must be an absolute http(s) URL, got scheme {parts.scheme!r}"
                         if parts.scheme else "must be an absolute http(s) URL")
    if not parts.hostname:
        raise ValueError("must include a host")


def render_template(url: str, values: Mapping[str, str | None]) -> str:
    """``url`` with every placeholder replaced by its value, percent-encoded; a missing value becomes ""."""
    out: list[str] = []
    for literal, name in parse_template(url):
        out.append(literal)
        if name is not None:
            value = values.get(name)
            out.append("" if value is None else quote(str(value), safe=""))
    return "".join(out)
