"""`postback stack up | status | down` as a user runs it: real processes, then nothing left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.clickhouse_local import ping
from deploy.kafka_local import kafka_ready
from deploy.procs import pid_alive, port_open
from postback.config import Settings


def _postback(state: Path, *args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL")}
    env["POSTBACK_STATE_DIR"] = str(state)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


PORTS = ["--kafka-port", "0", "--kafka-controller-port", "0", "--clickhouse-http-port", "0",
         "--clickhouse-tcp-port", "0"]


@pytest.mark.skipif(bool(Settings.from_env().kafka_bootstrap_servers), reason="external Kafka configured")
def test_stack_up_is_idempotent_and_down_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    try:
        up = _postback(state, "stack", "up", *PORTS)
        assert up.returncode == 0, up.stdout + up.stderr
        status = json.loads(_postback(state, "stack", "status", "--json").stdout)
        by_name = {s["name"]: s for s in status}
        assert by_name["kafka"]["state"] == "running" and by_name["clickhouse"]["state"] == "running"
        assert kafka_ready(by_name["kafka"]["address"])
        assert ping(by_name["clickhouse"]["address"])
        assert (state / "kafka" / "data" / "meta.properties").exists()
        assert (state / "clickhouse" / "data").is_dir()

        again = _postback(state, "stack", "up", "--json", *PORTS)
        assert again.returncode == 0, again.stderr
        assert {s["name"]: s["pid"] for s in json.loads(again.stdout)} == \
            {name: s["pid"] for name, s in by_name.items()}, "a second `up` must reuse the running services"

        plain = _postback(state, "stack", "status")
        assert "kafka      running at 127.0.0.1:" in plain.stdout
        assert "clickhouse running at http://127.0.0.1:" in plain.stdout
    finally:
        down = _postback(state, "stack", "down")
    assert down.returncode == 0, down.stderr
    for service in by_name.values():
        assert not pid_alive(service["pid"]), f"{service['name']} still runs"
    kafka_host, _, kafka_port = by_name["kafka"]["address"].rpartition(":")
    assert not port_open(kafka_host, int(kafka_port))
    assert not ping(by_name["clickhouse"]["address"])
    final = json.loads(_postback(state, "stack", "status", "--json").stdout)
    assert [s["state"] for s in final] == ["stopped", "stopped"]


def test_external_services_are_reported_not_started(tmp_path: Path) -> None:
    env = dict(os.environ, POSTBACK_STATE_DIR=str(tmp_path), KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
               CLICKHOUSE_URL="http://127.0.0.1:1")
    done = subprocess.run([sys.executable, "-m", "app.cli", "stack", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [(s["state"], s["address"]) for s in json.loads(done.stdout)] == [
        ("unreachable", "127.0.0.1:1"), ("unreachable", "http://127.0.0.1:1")]
