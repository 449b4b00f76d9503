"""Refuse outbound requests to loopback, private, link-local and cloud metadata targets.

An affiliate's postback URL is configuration written by people outside the company; sent
from inside the network, it must not reach internal services. Unless an endpoint sets
``allow_private``, a target is refused when its host is, or resolves to, an address that
is not public: loopback, private (RFC 1918, ``fc00::/7``), link-local (``169.254/16``
with the ``169.254.169.254`` metadata address, ``fe80::/10``), unspecified, multicast,
reserved or otherwise not globally routable, shared (CGNAT ``100.64/10``), and the
IPv4-mapped / 6to4 IPv6 forms of those; or when the host is a well-known metadata name.
EVERY address a name resolves to must be public: one private answer refuses it.

Three checks, all needed:

- ``check_target(url, allow_private)`` before a request (literal addresses never reach a
  resolver, so they are only checked here);
- ``GuardedResolver`` as the ``aiohttp.TCPConnector`` resolver, which checks the
  addresses the connection is actually made to, so a name that resolves to a public
  address for the check and to a private one a moment later (DNS rebinding) is still
  refused: ``TCPConnector(resolver=GuardedResolver(allow_private=False))``;
- ``check_redirect(location, base_url, endpoint)`` for a 3xx answer: refused unless the
  endpoint sets ``follow_redirects``, and then the next hop is checked like the first.
  Send with ``allow_redirects=False`` and follow hops through this (at most
  ``MAX_REDIRECTS``).

Create the session with ``trust_env=False``: a proxy would make the resolver see only
the proxy's address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urljoin, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from postback.partner_model import OutboundEndpoint

__all__ = ["METADATA_HOSTS", "MAX_REDIRECTS", "GuardedResolver", "RedirectRefused", "TargetRefused",
           "address_refusal", "check_redirect", "check_target", "check_target_async", "host_refusal"]

#: Host names of cloud instance metadata services (compared lower-case, without a trailing dot).
METADATA_HOSTS: frozenset[str] = frozenset({
    "metadata.google.internal", "metadata.goog", "metadata", "instance-data",
    "instance-data.ec2.internal", "metadata.azure.internal", "metadata.tencentyun.com",
})
#: Hops followed at most when an endpoint follows redirects.
MAX_REDIRECTS = 5

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_METADATA_ADDRS = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                             ipaddress.ip_address("100.100.100.200")})

Resolve = Callable[..., Any]


class TargetRefused(Exception):
    """The request is not sent: its target is not public (or a redirect is not allowed).

    ``reason`` says why, naming the host or address but never a URL's query (which may
    carry a signature).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


class RedirectRefused(TargetRefused):
    """A 3xx answer from an endpoint that does not follow redirects (or too many hops)."""


def address_refusal(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` may not be a target, or None when it is public.

    Something that is not an IP address is refused too.
    """
    try:
        addr = (address if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address))
                else ipaddress.ip_address(str(address).split("%", 1)[0]))
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        for embedded, form in ((addr.ipv4_mapped, "IPv4-mapped"), (addr.sixtofour, "6to4")):
            if embedded is not None:
                inner = address_refusal(embedded)
                if inner is not None:
                    return f"{addr} is the {form} form of a refused address: {inner}"
    if addr in _METADATA_ADDRS:
        return f"{addr} is a cloud metadata address"
    checks = (
        (addr.is_unspecified, "unspecified"), (addr.is_loopback, "loopback"),
        (addr.is_link_local, "link-local"), (addr.is_multicast, "multicast"),
        (isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT, "shared (CGNAT 100.64.0.0/10)"),
        (addr.is_private, "private"), (addr.is_reserved, "reserved"),
    )
    for hit, what in checks:
        if hit:
            article = "an" if what[0] in "aeiou" else "a"
            return f"{addr} is {article} {what} address"
    if not addr.is_global:
        return f"{addr} is not a globally routable address"
    return None


def _host(hostname: str) -> str:
    return hostname.strip().lower().rstrip(".")


def host_refusal(hostname: str) -> str | None:
    """Why the host NAME may not be a target before it is resolved (metadata, localhost), or None."""
    host = _host(hostname)
    if host in METADATA_HOSTS:
        return f"{host} is a cloud metadata host"
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is a loopback host"
    return None


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _split(url: str) -> tuple[str, int]:
    """(host, port) of an absolute http(s) URL; TargetRefused otherwise."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise TargetRefused(f"not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TargetRefused(f"scheme {scheme!r} is not http or https")
    if not host:
        raise TargetRefused("the URL has no host")
    return host, port if port is not None else (443 if scheme == "https" else 80)


def check_target(url: str, allow_private: bool = False, resolve: Resolve = socket.getaddrinfo) -> None:
    """Raise TargetRefused unless ``url`` is an http(s) URL whose host and EVERY resolved address is public.

    ``resolve`` is called like ``socket.getaddrinfo(host, port, 0, SOCK_STREAM)`` (inject
    a fake in tests); it blocks, so call this from a thread in async code, or rely on
    ``GuardedResolver`` for names and call this with a resolver that is never used
    (literal addresses are not resolved). A name that does not resolve raises the
    resolver's ``OSError`` (``socket.gaierror``): a connect failure, not a refusal.
    With ``allow_private`` only the scheme and host are checked.
    """
    host, port = _split(url)
    if allow_private:
        return
    literal = _literal(host)
    if literal is not None:
        reason = address_refusal(literal)
        if reason is not None:
            raise TargetRefused(reason)
        return
    reason = host_refusal(host)
    if reason is not None:
        raise TargetRefused(reason)
    infos = resolve(host, port, 0, socket.SOCK_STREAM)
    addresses = [info[4][0] for info in infos]
    if not addresses:
        raise TargetRefused(f"{_host(host)} resolves to no address")
    for address in addresses:
        reason = address_refusal(address)
        if reason is not None:
            raise TargetRefused(f"{_host(host)} resolves to {reason}")


async def check_target_async(url: str, allow_private: bool = False, resolve: Resolve = socket.getaddrinfo) -> None:
    """``check_target`` with the (blocking) resolution in the default executor."""
    await asyncio.get_running_loop().run_in_executor(None, check_target, url, allow_private, resolve)


def check_redirect(location: str, base_url: str, endpoint: OutboundEndpoint,
                   resolve: Resolve = socket.getaddrinfo) -> str:
    """The absolute URL a 3xx ``Location`` points to, once it may be followed.

    RedirectRefused when the endpoint does not follow redirects or there is no
    ``Location``; TargetRefused when the next hop is not public (unless
    ``allow_private``) or not http(s). Count hops yourself against ``MAX_REDIRECTS``.
    """
    if not endpoint.follow_redirects:
        raise RedirectRefused(f"{endpoint.endpoint_id}: answered with a redirect, and follow_redirects is off")
    if not location or not location.strip():
        raise RedirectRefused(f"{endpoint.endpoint_id}: redirect without a Location")
    target = urljoin(base_url, location.strip())
    try:
        check_target(target, endpoint.allow_private, resolve)
    except TargetRefused as e:
        raise TargetRefused(f"redirect refused: {e.reason}") from None
    return target


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses names resolving to any non-public address.

    Wraps ``inner`` (aiohttp's default resolver when None). Raises TargetRefused, which
    aiohttp passes through to the caller of ``session.request`` unchanged. With
    ``allow_private`` it only delegates. Literal IP hosts never reach a resolver: check
    them with ``check_target``.
    """

    def __init__(self, allow_private: bool = False, inner: AbstractResolver | None = None) -> None:
        self.allow_private = allow_private
        self._inner = inner
        self._owns_inner = inner is None

    def _resolver(self) -> AbstractResolver:
        if self._inner is None:
            self._inner = DefaultResolver()
        return self._inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if not self.allow_private:
            reason = host_refusal(host)
            if reason is not None:
                raise TargetRefused(reason)
        results = await self._resolver().resolve(host, port, family)
        if not self.allow_private:
            for result in results:
                reason = address_refusal(result["host"])
                if reason is not None:
                    raise TargetRefused(f"{_host(host)} resolves to {reason}")
        return results

    async def close(self) -> None:
        if self._inner is not None and self._owns_inner:
            await self._inner.close()
