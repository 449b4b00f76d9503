"""The local ClickHouse is real ClickHouse: served over HTTP to other processes, and embedded."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from deploy.chserver import config_xml
from deploy.clickhouse_local import embedded_client, ping
from deploy.providers import ClickHouseService

SECOND_PROCESS = """
import json, sys, urllib.request
url, db = sys.argv[1], sys.argv[2]
sql = f"SELECT id, name, version FROM {db}.items FINAL ORDER BY id FORMAT JSONCompact"
with urllib.request.urlopen(url, data=sql.encode(), timeout=10) as resp:
    print(json.dumps(json.loads(resp.read())["data"]))
"""


def test_ping_answers_ok(clickhouse: ClickHouseService) -> None:
    with urllib.request.urlopen(clickhouse.url + "/ping", timeout=5) as resp:
        assert resp.read() == b"Ok.\n"
    assert ping(clickhouse.url)


def test_replacing_merge_tree_final_seen_from_a_second_process(clickhouse: ClickHouseService, ch_database: str) -> None:
    client = clickhouse.client(ch_database)
    version = client.query("SELECT version()").result_rows[0][0]
    assert version.startswith("26.9"), version
    client.command("CREATE TABLE items (id UInt64, name String, version UInt64) "
                   "ENGINE = ReplacingMergeTree(version) ORDER BY id")
    client.insert("items", [[1, "old", 1], [2, "only", 1]], column_names=["id", "name", "version"])
    client.insert("items", [[1, "new", 2]], column_names=["id", "name", "version"])
    assert client.query("SELECT count() FROM items").result_rows[0][0] == 3  # both parts are there

    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, clickhouse.url, ch_database],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[1, "new", 2], [2, "only", 1]]  # UInt64 comes back as numbers


def _http_error(url: str, sql: str) -> tuple[int, bytes]:
    try:
        urllib.request.urlopen(f"{url}/?{urllib.parse.urlencode({'query': sql})}", timeout=5)
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    raise AssertionError(f"{sql!r} was accepted")


def test_server_rejects_bad_sql_and_keeps_serving(clickhouse: ClickHouseService) -> None:
    code, body = _http_error(clickhouse.url, "SELECT (((")
    assert code == 400 and b"SYNTAX_ERROR" in body
    code, body = _http_error(clickhouse.url, "SELECT * FROM no_such_table_here")
    assert code == 404 and b"UNKNOWN_TABLE" in body
    assert ping(clickhouse.url)


def test_embedded_chdb_client_persists_to_its_path(tmp_path: Path) -> None:
    client = embedded_client(tmp_path / "chdb")
    client.command("CREATE DATABASE IF NOT EXISTS emb")
    client.command("CREATE TABLE emb.t (k String, v Decimal(18, 6)) ENGINE = ReplacingMergeTree ORDER BY k")
    client.insert("emb.t", [["a", "1.5"], ["a", "2.25"], ["b", "3"]], column_names=["k", "v"])
    rows = client.query("SELECT k, v FROM emb.t FINAL ORDER BY k").result_rows
    assert [(k, str(v)) for k, v in rows] == [("a", "2.250000"), ("b", "3.000000")]
    assert any((tmp_path / "chdb").rglob("*.sql")), "table metadata was not written under the chdb path"


def test_config_xml_listens_on_the_given_ports(tmp_path: Path) -> None:
    xml = config_xml("127.0.0.1", 1111, 2222, tmp_path)
    assert "<http_port>1111</http_port>" in xml and "<tcp_port>2222</tcp_port>" in xml
    assert "<listen_host>127.0.0.1</listen_host>" in xml
