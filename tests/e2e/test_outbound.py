"""Outbound postbacks end to end: traffic through HTTP only, `postback run`, local affiliate endpoints.

A click and the advertiser's signed postbacks go in through the ingester; the whole pipeline
(processor, commission, sink, outbound delivery) runs under `postback run`. Two affiliates
have endpoints on a loopback server (allowed explicitly): a healthy one, and one that fails
twice with 503 before it recovers. Each conversion version must arrive signed (checked with
an independent HMAC computation per docs/signing.md), with the idempotency key
`conversion_id:version`, and succeed exactly once per key; every attempt is in ClickHouse.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from deploy.providers import ClickHouseService, KafkaService
from postback.signing import canonical_query

from .conftest import SECRET, Pipeline, eventually, http_get, running_pipeline, signed_query

WAIT_S = 120.0
AFFILIATE_SECRET = "affiliate-outbound-secret-0123456789"


class Affiliates:
    """A loopback server playing two affiliates' postback endpoints; records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parts = urllib.parse.urlsplit(self.path)
                key = self.headers.get("Idempotency-Key", "")
                with outer.lock:
                    outer.seen[(parts.path, key)] += 1
                    n = outer.seen[(parts.path, key)]
                    status = 503 if parts.path == "/recovering" and n <= 2 else 200
                    outer.requests.append({"path": parts.path, "query": parts.query, "key": key, "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def delivered(self, path: str) -> dict[str, list[dict[str, Any]]]:
        """idempotency key -> its successful requests on `path`."""
        with self.lock:
            out: dict[str, list[dict[str, Any]]] = {}
            for r in self.requests:
                if r["path"] == path and r["status"] == 200:
                    out.setdefault(r["key"], []).append(r)
            return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _partners(base: str) -> str:
    return f"""
[account]
reporting_currency = "USD"

[advertisers.shop]
secrets = {{ k1 = "{SECRET}" }}

[affiliates.aff-good.postbacks.main]
url = "{base}/good?cid={{click_id}}&p={{payout}}&cur={{payout_currency}}&s={{status}}&k={{idempotency_key}}"
secret = "{AFFILIATE_SECRET}"
allow_private = true

[affiliates.aff-flaky.postbacks.main]
url = "{base}/recovering?cid={{click_id}}&k={{idempotency_key}}"
retry_schedule_s = [1, 1, 1]
allow_private = true

[offers.off-1]
advertiser_id = "shop"
[offers.off-1.payouts.purchase]
type = "cpa"
amount = "4.00"
currency = "USD"
"""


@pytest.fixture(scope="module")
def affiliates() -> Iterator[Affiliates]:
    server = Affiliates()
    yield server
    server.close()


@pytest.fixture(scope="module")
def pipe(kafka: KafkaService, clickhouse: ClickHouseService, affiliates: Affiliates,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    with running_pipeline(tmp_path_factory.mktemp("outbound"), kafka.bootstrap_servers, clickhouse.url,
                          partners_toml=_partners(affiliates.base)) as pipeline:
        yield pipeline


def _conversion(pipe: Pipeline, affiliate: str, status: str = "approved") -> tuple[str, str]:
    resp = http_get(f"{pipe.url}/click?offer_id=off-1&affiliate_id={affiliate}")
    assert resp.status == 200, (resp.status, resp.body)
    click = resp.json()["click_id"]
    order = f"o-{uuid.uuid4().hex[:10]}"
    params = [("advertiser_id", "shop"), ("event", "purchase"), ("click_id", click), ("order_id", order),
              ("amount", "25.00"), ("currency", "USD"), ("status", status)]
    resp = pipe.get("/postback?" + signed_query(params, kid="k1"))
    assert resp.status == 202, (resp.status, resp.body)
    return click, order


def _signed_by_us(query: str) -> bool:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    sig = dict(pairs)["sig"]
    unsigned = [(k, v) for k, v in pairs if k != "sig"]
    expected = hmac.new(AFFILIATE_SECRET.encode(), canonical_query(unsigned).encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(sig, expected)


def test_each_conversion_version_reaches_its_affiliate_once_per_key_signed(pipe: Pipeline,
                                                                           affiliates: Affiliates) -> None:
    good = [_conversion(pipe, "aff-good") for _ in range(5)]
    flaky = [_conversion(pipe, "aff-flaky") for _ in range(3)]
    # A status change of one order: a new version, so a second key for the same conversion.
    click, order = good[0]
    params = [("advertiser_id", "shop"), ("event", "purchase"), ("click_id", click), ("order_id", order),
              ("amount", "25.00"), ("currency", "USD"), ("status", "rejected")]
    assert pipe.get("/postback?" + signed_query(params, kid="k1")).status == 202

    got_good = eventually(lambda: (lambda d: d if len(d) == 6 else None)(affiliates.delivered("/good")), WAIT_S,
                          f"6 deliveries to aff-good\n{pipe.logs()}")
    got_flaky = eventually(lambda: (lambda d: d if len(d) == 3 else None)(affiliates.delivered("/recovering")),
                           WAIT_S, f"3 deliveries to aff-flaky after its 503s\n{pipe.logs()}")

    # Exactly one success per key (counted by key); keys are conversion_id:version.
    assert all(len(requests) == 1 for requests in got_good.values()), got_good
    assert all(len(requests) == 1 for requests in got_flaky.values()), got_flaky
    versions = collections.Counter(key.rsplit(":", 1)[0] for key in got_good)
    assert sorted(versions.values()) == [1, 1, 1, 1, 2]  # the rejected order: versions 1 and 2
    assert {key.rsplit(":", 1)[1] for key in got_good} == {"1", "2"}
    for requests in got_good.values():
        query = dict(urllib.parse.parse_qsl(requests[0]["query"]))
        assert _signed_by_us(requests[0]["query"]), requests[0]["query"]
        assert query["k"] == requests[0]["key"] and query["cur"] == "USD"
        assert (query["s"], query["p"]) in {("approved", "4.000000"), ("rejected", "0.000000")}
    with affiliates.lock:  # the flaky endpoint saw its two 503s per key before the success
        attempts = collections.Counter(r["key"] for r in affiliates.requests if r["path"] == "/recovering")
    assert set(attempts.values()) == {3}

    keys = sorted(got_good) + sorted(got_flaky)

    def logged() -> list[dict[str, Any]] | None:
        rows = pipe.query("SELECT idempotency_key, outcome, status FROM outbound_deliveries FINAL "
                          "WHERE idempotency_key IN {k:Array(String)}", {"k": keys})
        done = {r["idempotency_key"] for r in rows if r["outcome"] == "delivered"}
        return rows if done == set(keys) else None

    rows = eventually(logged, WAIT_S, f"the delivery log in ClickHouse\n{pipe.logs()}")
    retries = [r for r in rows if r["outcome"] == "retry"]
    assert len(retries) == 2 * len(got_flaky) and all(r["status"] == 503 for r in retries)
    assert not any(AFFILIATE_SECRET in str(r) for r in rows)
