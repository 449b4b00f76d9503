"""``postback sign``: sign a test postback the way a partner must (see docs/signing.md).

Use it to produce reference signatures while a partner wires up their integration,
or to send a hand-made signed postback to an ingester with the printed curl command.
Register it with ``register(subparsers)``; the handler needs no settings.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from postback.signing import canonical_query, sign_json, sign_query

_DESCRIPTION = """\
Sign a postback the way an advertiser's server must, as specified in docs/signing.md.
Prints the exact values to send, so you can compare them with a partner's, or send a
hand-made signed postback to an ingester.

Query/form signing (the default): the --param pairs, plus any parameters already in
the --url query string, get ts (and kid) added and are signed with sig=. Prints the
signed query string. With --url, it also prints a curl command that sends it as a GET.

Header signing (--json-body): signs the exact bytes of the file (or of stdin for "-")
as "<ts>." + body. Prints the X-Postback-Timestamp, X-Postback-Key-Id and
X-Postback-Signature headers. With --url, it also prints a curl command that POSTs
the body. Every field must then be in the body, so --param and a query string in --url
are refused.

The signature is only accepted within the advertiser's timestamp tolerance (300 s by
default) of --ts. Use the printed values promptly, or pass the --ts you need."""

_EPILOG = """\
examples:
  postback sign --secret-file acme.key --kid k2026 \\
      --param advertiser_id=acme --param event=purchase --param order_id=A-1001
  postback sign --secret-file acme.key --ts 1767225600 --param 'customer=Jane Doe' \\
      --url https://postbacks.example.com/postback
  printf '%s' '{"advertiser_id":"acme","event":"purchase"}' > body.json
  postback sign --secret-file acme.key --json-body body.json --url https://postbacks.example.com/postback

--secret puts the secret on the command line, where other users can see it in ps and
where it ends up in your shell history. Prefer --secret-file."""


def _pair(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _timestamp(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected unix seconds (digits only), got {text!r}")
    return int(text)


def _fail(message: str) -> int:
    print(f"postback sign: error: {message}", file=sys.stderr)
    return 2


def _secret(args: argparse.Namespace) -> str:
    if args.secret is not None:
        return str(args.secret)
    return Path(args.secret_file).read_text(encoding="utf-8").rstrip("\r\n")


def _encode(params: list[tuple[str, str]]) -> str:
    return urlencode(params, quote_via=quote, safe="-_.~")


def _sign(args: argparse.Namespace, settings: Any = None) -> int:
    """Handler for ``postback sign``; ``settings`` is not used (may be None)."""
    try:
        secret = _secret(args)
    except (OSError, UnicodeDecodeError) as exc:
        return _fail(f"cannot read --secret-file: {exc}")
    if not secret:
        return _fail("the secret is empty")
    ts = int(time.time()) if args.ts is None else args.ts
    url = urlsplit(args.url) if args.url else None

    if args.json_body is None:
        params: list[tuple[str, str]] = []
        if url is not None and url.query:
            try:
                params = parse_qsl(url.query, keep_blank_values=True, errors="strict")
            except (ValueError, UnicodeDecodeError) as exc:
                return _fail(f"cannot read the query string of --url: {exc}")
        params += list(args.param)
        try:
            signed = sign_query(params, secret, ts, kid=args.kid)
        except ValueError as exc:
            return _fail(str(exc))
        query = _encode(signed)
        print(query)
        if args.verbose_canonical:
            print(f"canonical: {canonical_query(signed)}", file=sys.stderr)
        if url is not None:
            target = urlunsplit((url.scheme, url.netloc, url.path, query, ""))
            print(f"curl -sS {shlex.quote(target)}")
        return 0

    if args.param:
        return _fail("--param cannot be combined with --json-body: with header signing every field "
                     "must be in the body (the signature does not cover the query string)")
    if url is not None and url.query:
        return _fail("--url must not have a query string with --json-body: with header signing every "
                     "field must be in the body (the signature does not cover the query string)")
    try:
        body = sys.stdin.buffer.read() if args.json_body == "-" else Path(args.json_body).read_bytes()
    except OSError as exc:
        return _fail(f"cannot read --json-body: {exc}")
    headers = sign_json(body, secret, ts, kid=args.kid)
    for name, value in headers.items():
        print(f"{name}: {value}")
    if url is not None:
        if args.json_body == "-":
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                return _fail("the body read from stdin is not UTF-8 text; pass it as a file to get a curl command")
            if "\x00" in text:
                return _fail("the body read from stdin contains NUL bytes; pass it as a file to get a curl command")
            data = shlex.quote(text)
        else:
            data = shlex.quote("@" + args.json_body)
        parts = [f"curl -sS {shlex.quote(urlunsplit(url))}", "-H 'Content-Type: application/json'"]
        parts += [f"-H {shlex.quote(f'{name}: {value}')}" for name, value in headers.items()]
        parts.append(f"--data-binary {data}")
        print(" \\\n  ".join(parts))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sign`` subcommand to a ``postback`` subparsers object."""
    p = sub.add_parser(
        "sign", help="sign a test postback (query string or JSON headers) as a partner must",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    secret = p.add_mutually_exclusive_group(required=True)
    secret.add_argument("--secret", metavar="S",
                        help="the HMAC secret (visible in ps and shell history; prefer --secret-file)")
    secret.add_argument("--secret-file", metavar="FILE",
                        help="read the secret from FILE (UTF-8; trailing newlines are ignored)")
    p.add_argument("--kid", metavar="K",
                   help="key id to send (kid= parameter or X-Postback-Key-Id header); "
                        "default: none, so the receiver tries every active key")
    p.add_argument("--ts", metavar="T", type=_timestamp,
                   help="timestamp to sign, unix seconds (default: now)")
    p.add_argument("--json-body", metavar="FILE_OR_-",
                   help="sign this JSON body with the X-Postback-Signature header instead of signing "
                        "parameters ('-' reads stdin); the exact bytes are signed")
    p.add_argument("--param", metavar="KEY=VALUE", type=_pair, action="append", default=[],
                   help="a parameter to sign, decoded (e.g. 'customer=Jane Doe'); repeatable, "
                        "order and duplicates are kept")
    p.add_argument("--url", metavar="BASE",
                   help="ingester postback URL (e.g. https://postbacks.example.com/postback); also print "
                        "a curl command. In query mode, parameters already in its query string are signed too")
    p.add_argument("--show-canonical", dest="verbose_canonical", action="store_true",
                   help="query mode: also print the canonical string that was signed (to stderr)")
    p.set_defaults(handler=_sign)
