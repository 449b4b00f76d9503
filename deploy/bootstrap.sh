#!/usr/bin/env bash
# Install everything postback-pipeline needs on a fresh machine, idempotently:
#   - Java 17+ and Maven (apt-get, when missing and we are root),
#   - a Python venv at ./.venv with the project and its dev extras,
#   - the Apache Kafka broker jars, resolved from Maven Central into the per-user cache.
# Safe to re-run: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[bootstrap] %s\n' "$*"; }

need_apt=()
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
required=${#need_apt[@]}
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)   # optional: the load generator of python -m bench.ingest_http
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${need_apt[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  elif ((required)); then
    say "missing: ${need_apt[*]} (install Java 17+ and Maven, then re-run)"; exit 1
  else
    say "optional: ${need_apt[*]} not installed (only python -m bench.ingest_http needs it)"
  fi
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
if [ ! -e .venv/.installed ] || ! .venv/bin/python -c 'import postback, confluent_kafka, faust, clickhouse_connect, fastavro' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing the project and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev,fast]'
  touch .venv/.installed
fi

say "Kafka broker jars"
.venv/bin/postback stack fetch
say "ready"
