"""The private-address guard: literals, resolved names, IPv6, metadata, redirects, and the connect-time resolver."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from postback.partners import OutboundEndpoint
from sinks.outbound.guard import (
    GuardedResolver,
    RedirectRefused,
    TargetRefused,
    address_refusal,
    check_redirect,
    check_target,
    check_target_async,
)

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"


def resolver(*addresses: str) -> Callable[..., list[tuple[Any, ...]]]:
    """A getaddrinfo stand-in answering every name with ``addresses``; records its calls."""
    def resolve(host: str, port: int, family: int = 0, type: int = 0, *rest: Any) -> list[tuple[Any, ...]]:
        resolve.calls.append((host, port))  # type: ignore[attr-defined]
        out = []
        for a in addresses:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            sockaddr = (a, port, 0, 0) if fam == socket.AF_INET6 else (a, port)
            out.append((fam, socket.SOCK_STREAM, 6, "", sockaddr))
        return out
    resolve.calls = []  # type: ignore[attr-defined]
    return resolve


def never(*_: Any) -> Any:
    raise AssertionError("a literal address must not be resolved")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://127.8.9.10:8080/x", "http://10.0.0.5/", "http://172.16.3.4/",
    "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data/", "http://169.254.1.1/",
    "http://0.0.0.0/", "http://100.64.0.1/", "http://100.127.255.254/", "http://224.0.0.1/",
    "http://240.0.0.1/", "http://255.255.255.255/", "http://192.0.2.10/",
    "http://[::1]/", "http://[::]/", "http://[fc00::1]/", "http://[fd12:3456::1]/", "http://[fe80::1]/",
    "http://[fe80::1%25eth0]/", "http://[ff02::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.5]/",
    "http://[::ffff:169.254.169.254]/", "http://[2002:7f00:1::1]/", "http://[fd00:ec2::254]/",
])
def test_private_literals_refused(url: str) -> None:
    with pytest.raises(TargetRefused):
        check_target(url, False, never)


@pytest.mark.parametrize("url", [f"https://{PUBLIC_V4}/pb?x=1", f"http://[{PUBLIC_V6}]:8443/"])
def test_public_literals_pass(url: str) -> None:
    check_target(url, False, never)


def test_name_resolving_to_private_is_refused() -> None:
    res = resolver("10.0.0.5")
    with pytest.raises(TargetRefused, match=r"aff\.example resolves to 10\.0\.0\.5 is a private address"):
        check_target("https://aff.example/pb?sig=secret-sig", False, res)
    assert res.calls == [("aff.example", 443)]  # type: ignore[attr-defined]


def test_every_resolved_address_must_be_public() -> None:
    with pytest.raises(TargetRefused, match="loopback"):
        check_target("http://aff.example:8080/", False, resolver(PUBLIC_V4, "127.0.0.1"))
    with pytest.raises(TargetRefused, match="link-local"):
        check_target("http://aff.example/", False, resolver(PUBLIC_V6, "fe80::1%eth0"))
    with pytest.raises(TargetRefused, match="IPv4-mapped"):
        check_target("http://aff.example/", False, resolver("::ffff:192.168.0.1"))
    check_target("http://aff.example/", False, resolver(PUBLIC_V4, PUBLIC_V6))


def test_resolution_failure_is_not_a_refusal() -> None:
    def fail(*_: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with pytest.raises(socket.gaierror):
        check_target("http://nowhere.example/", False, fail)
    with pytest.raises(TargetRefused, match="no address"):
        check_target("http://aff.example/", False, resolver())


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.google.internal.", "metadata",
                                  "localhost", "api.localhost"])
def test_metadata_and_localhost_names_refused_before_resolving(host: str) -> None:
    with pytest.raises(TargetRefused):
        check_target(f"http://{host}/computeMetadata/v1/", False, never)


@pytest.mark.parametrize("url", ["ftp://aff.example/", "file:///etc/passwd", "http:///x", "aff.example/pb",
                                 "http://[::1/"])
def test_non_http_urls_refused_even_when_private_is_allowed(url: str) -> None:
    with pytest.raises(TargetRefused):
        check_target(url, True, never)


def test_allow_private() -> None:
    for url in ("http://127.0.0.1:9/", "http://10.0.0.5/", "http://metadata.google.internal/", "http://[::1]/"):
        check_target(url, True, never)
    check_target("http://internal.example/", True, never)  # not even resolved


def test_refusal_reason_carries_no_query() -> None:
    with pytest.raises(TargetRefused) as info:
        check_target("http://10.1.1.1/pb?sig=deadbeef&token=tok", False, never)
    assert "deadbeef" not in str(info.value) and "tok" not in info.value.reason


def test_address_refusal_public_and_garbage() -> None:
    assert address_refusal(PUBLIC_V4) is None and address_refusal(PUBLIC_V6) is None
    assert address_refusal("not-an-ip") is not None
    assert "CGNAT" in (address_refusal("100.64.0.1") or "")
    assert "metadata" in (address_refusal("169.254.169.254") or "")


def test_check_target_async() -> None:
    with pytest.raises(TargetRefused):
        asyncio.run(check_target_async("http://aff.example/", False, resolver("192.168.7.7")))
    asyncio.run(check_target_async("http://aff.example/", False, resolver(PUBLIC_V4)))


# ----------------------------------------------------------------- redirects

def endpoint(**kw: Any) -> OutboundEndpoint:
    return OutboundEndpoint(**{"affiliate_id": "aff-1", "name": "main", "url": "https://aff.example/pb", **kw})


def test_redirect_not_followed_by_default() -> None:
    with pytest.raises(RedirectRefused, match="follow_redirects"):
        check_redirect("https://other.example/", "https://aff.example/pb", endpoint(), resolver(PUBLIC_V4))


def test_redirect_followed_and_each_hop_checked() -> None:
    ep = endpoint(follow_redirects=True)
    assert check_redirect("/next?a=1", "https://aff.example/pb?x=2", ep, resolver(PUBLIC_V4)) \
        == "https://aff.example/next?a=1"
    assert check_redirect("https://other.example/z", "https://aff.example/pb", ep, resolver(PUBLIC_V4)) \
        == "https://other.example/z"
    with pytest.raises(TargetRefused, match="redirect refused") as info:
        check_redirect("http://169.254.169.254/latest/", "https://aff.example/pb", ep, never)
    assert not isinstance(info.value, RedirectRefused)
    with pytest.raises(TargetRefused):
        check_redirect("https://rebound.example/", "https://aff.example/pb", ep, resolver("10.9.9.9"))
    with pytest.raises(TargetRefused, match="scheme"):
        check_redirect("gopher://aff.example/", "https://aff.example/pb", ep, never)
    with pytest.raises(RedirectRefused):
        check_redirect("", "https://aff.example/pb", ep, never)


def test_redirect_to_private_allowed_with_allow_private() -> None:
    ep = endpoint(follow_redirects=True, allow_private=True)
    assert check_redirect("http://127.0.0.1:8080/", "https://aff.example/", ep, never) == "http://127.0.0.1:8080/"


# ----------------------------------------------------------------- at connect time, through aiohttp

class FakeResolver(AbstractResolver):
    """Answers every name with one address (what a rebinding DNS server would do at connect time)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.calls: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.calls.append(host)
        return [{"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def _serve_and_get(resolver_: AbstractResolver, host: str = "pb.test") -> tuple[int, str]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/pb", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        connector = aiohttp.TCPConnector(resolver=resolver_)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            async with session.get(f"http://{host}:{port}/pb",
                                   timeout=aiohttp.ClientTimeout(total=5)) as resp:
                return resp.status, await resp.text()
    finally:
        await runner.cleanup()


def test_guarded_resolver_refuses_loopback_at_connect_time() -> None:
    inner = FakeResolver("127.0.0.1")
    # The name looked public when it was checked...
    check_target("http://pb.test/pb", False, resolver(PUBLIC_V4))
    # ...and resolves to loopback when the connection is made: refused.
    with pytest.raises(TargetRefused, match=r"pb\.test resolves to 127\.0\.0\.1 is a loopback address"):
        asyncio.run(_serve_and_get(GuardedResolver(allow_private=False, inner=inner)))
    assert inner.calls == ["pb.test"]


def test_guarded_resolver_allows_loopback_when_allowed() -> None:
    status, text = asyncio.run(_serve_and_get(GuardedResolver(allow_private=True, inner=FakeResolver("127.0.0.1"))))
    assert (status, text) == (200, "ok")


def test_guarded_resolver_refuses_localhost_without_resolving() -> None:
    inner = FakeResolver("127.0.0.1")
    with pytest.raises(TargetRefused, match="loopback host"):
        asyncio.run(_serve_and_get(GuardedResolver(inner=inner), host="localhost"))
    assert inner.calls == []


def test_guarded_resolver_passes_public_answers() -> None:
    async def go() -> list[ResolveResult]:
        guarded = GuardedResolver(inner=FakeResolver(PUBLIC_V4))
        try:
            return await guarded.resolve("aff.example", 443)
        finally:
            await guarded.close()
    assert [r["host"] for r in asyncio.run(go())] == [PUBLIC_V4]
