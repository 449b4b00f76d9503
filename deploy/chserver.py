"""Child-process entry point: serve ClickHouse 26.9 over HTTP and native TCP from chdb-core.

Run as `python -m deploy.chserver --root DIR --http-port P --tcp-port T`. Why this shape
(see the developers' brief): `chdb.connect()` cannot serve, so we load the engine's
extension module `chdb/_chdb.abi3.so` directly, without importing the `chdb` package
(its import runs a query and breaks what follows), with a `config.xml` in the working
directory. One engine call then runs `SYSTEM START LISTEN HTTP; SYSTEM START LISTEN
TCP` followed by a keep-alive query that never returns, in a thread. The engine allows
one such call per process, so this process is the server and does nothing else.

Stopping: SIGTERM/SIGINT end the process. Never `KILL QUERY` the keep-alive query from
a client: that stops the server.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.machinery
import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path
from types import ModuleType

KEEPALIVE_SQL = "SELECT sleepEachRow(1) FROM system.numbers SETTINGS max_block_size = 1"


def config_xml(host: str, http_port: int, tcp_port: int, data_dir: Path) -> str:
    return f"""<clickhouse>
  <listen_host>{host}</listen_host>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <path>{data_dir}/</path>
  <max_concurrent_queries>200</max_concurrent_queries>
</clickhouse>
"""


def load_engine() -> ModuleType:
    """Load `_chdb.abi3.so` from the installed chdb-core without running `chdb/__init__.py`."""
    spec = importlib.util.find_spec("chdb")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chdb-core is not installed (pip install chdb-core==26.9.0)")
    so = Path(list(spec.submodule_search_locations)[0]) / "_chdb.abi3.so"
    # As chdb's own loader does: resolve operator new/delete from the engine's allocator.
    ctypes.CDLL(str(so), mode=sys.getdlopenflags() | 0x00008)  # RTLD_DEEPBIND
    loader = importlib.machinery.ExtensionFileLoader("_chdb", str(so))
    mod_spec = importlib.util.spec_from_file_location("_chdb", so, loader=loader)
    assert mod_spec is not None
    module = importlib.util.module_from_spec(mod_spec)
    loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.chserver", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="working directory; data goes to ROOT/data")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--tcp-port", type=int, required=True)
    args = parser.parse_args(argv)

    root: Path = args.root.absolute()
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (root / "config.xml").write_text(config_xml(args.host, args.http_port, args.tcp_port, data_dir))
    os.chdir(root)

    engine = load_engine()
    stop = threading.Event()
    failure: list[str] = []

    def serve() -> None:
        # The output format of this first call becomes the server's default format:
        # HTTP clients (clickhouse-connect, curl) expect a server's TabSeparated default.
        try:
            engine.query(
                f"SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; {KEEPALIVE_SQL}", "TabSeparated", path=str(data_dir)
            )
            failure.append("keep-alive query returned")
        except Exception as exc:  # noqa: BLE001 - reported below, then the process exits 1
            failure.append(f"{type(exc).__name__}: {exc}")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=serve, name="clickhouse-server", daemon=True).start()
    print(f"clickhouse serving http://{args.host}:{args.http_port} tcp {args.host}:{args.tcp_port}", flush=True)
    while not stop.wait(1.0):
        pass
    if failure:
        print(f"clickhouse server stopped: {failure[0]}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # The engine's threads cannot be joined from Python; writes are already on disk
    # (MergeTree inserts are synchronous), so leaving without interpreter teardown is safe.
    os._exit(1 if failure else 0)


if __name__ == "__main__":
    raise SystemExit(main())
