"""The faust and aiokafka internals the runtime relies on, verified once at start-up.

Why: the runtime fixes faust's consumer and batches its changelog by overriding and reading
private attributes of faust-streaming 0.15.3 and aiokafka 0.14.0 (pyproject.toml pins both).
A release that renames or drops one of them would not fail at import: it would silently
fall back to faust's own behaviour (skipped records, commits past unprocessed ones, a 1.5 s
fetch wait) or crash mid-stream. `check()` looks every one of them up before a worker
starts and raises `IncompatibleRuntime` naming each one that is missing and the installed
versions, so an upgrade fails loudly on the first start instead.

Guarantee: every private the runtime touches is listed in `REQUIRED` with the module that
uses it; a new use of a private belongs here too (tests/processors/runtime/test_compat.py
runs the check against the installed versions).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger("processors.runtime")

#: The versions the runtime was written and tested against.
TESTED = {"faust": "0.15.3", "aiokafka": "0.14.0"}

_FAUST_AIOKAFKA = "faust.transport.drivers.aiokafka"


@dataclass(frozen=True)
class Private:
    """`module`.`path` must exist. With `in_init`, `path`'s last part is an instance attribute:
    `__init__` of the class (or of an ancestor) must name it. With `reads`, the function at
    `path` must name each of those attributes (a contract on what it does with ours)."""

    module: str
    path: str
    used_by: str
    in_init: bool = False
    reads: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.module}.{self.path}"


REQUIRED: tuple[Private, ...] = (
    # processors.runtime.context: the current event of the agent's task
    Private("faust.streams", "_current_event", "context"),
    # processors.runtime.app: the transport (and so the consumer) of the app
    Private("faust", "App._new_transport", "app"),
    Private(_FAUST_AIOKAFKA, "Transport.Consumer", "app"),
    # processors.runtime.consumer: hole-free delivery, commits that never skip, the fetch wait
    Private(_FAUST_AIOKAFKA, "Consumer._new_consumer_thread", "consumer"),
    Private(_FAUST_AIOKAFKA, "AIOKafkaConsumerThread._create_worker_consumer", "consumer"),
    Private(_FAUST_AIOKAFKA, "Consumer.perform_seek", "consumer"),
    Private(_FAUST_AIOKAFKA, "Consumer.seek", "consumer"),
    Private(_FAUST_AIOKAFKA, "Consumer.getmany", "consumer"),
    Private(_FAUST_AIOKAFKA, "Consumer.earliest_offsets", "consumer"),
    Private(_FAUST_AIOKAFKA, "Consumer._new_offset", "consumer"),
    Private(_FAUST_AIOKAFKA, "Consumer._add_gap", "consumer"),
    Private(_FAUST_AIOKAFKA, "Consumer._gap", "consumer", in_init=True),
    Private(_FAUST_AIOKAFKA, "Consumer._acked", "consumer", in_init=True),
    Private(_FAUST_AIOKAFKA, "Consumer._committed_offset", "consumer", in_init=True),
    Private("aiokafka", "AIOKafkaConsumer._fetch_max_wait_ms", "consumer", in_init=True),
    Private("aiokafka", "AIOKafkaConsumer.start", "consumer", reads=("_fetch_max_wait_ms",)),
    # processors.runtime.tables: the changelog queued per batch, per-partition scans
    Private("faust", "Table.send_changelog", "tables"),
    Private("faust.tables.table", "Table.on_key_set", "tables", reads=("send_changelog", "message", "partition")),
    Private("faust.tables.table", "Table.on_key_del", "tables", reads=("send_changelog", "message", "partition")),
    Private("faust.tables.manager", "TableManager.beacon", "tables"),
    Private("faust.stores.rocksdb", "Store._db_for_partition", "tables"),
    Private("faust.stores.rocksdb", "Store._decode_key", "tables"),
    Private("faust.stores.rocksdb", "Store._decode_value", "tables"),
    Private("faust.stores.rocksdb", "Store.set_persisted_offset", "tables"),
    Private("faust.stores.rocksdb", "Store.offset_key", "tables"),
    Private("faust.stores.rocksdb", "Store.use_rocksdict", "tables", in_init=True),
    # processors.runtime.publish: Java's partitioner for the internal hops
    Private("aiokafka.partitioner", "murmur2", "publish"),
)


class IncompatibleRuntime(RuntimeError):
    """An installed faust or aiokafka lacks an internal the runtime relies on."""


def versions(import_module: Callable[[str], ModuleType] = importlib.import_module) -> dict[str, str]:
    """Installed version per library ("missing" when it cannot be imported)."""
    found: dict[str, str] = {}
    for name in TESTED:
        try:
            found[name] = str(getattr(import_module(name), "__version__", "unknown"))
        except ImportError:
            found[name] = "missing"
    return found


def missing(required: tuple[Private, ...] = REQUIRED,
            import_module: Callable[[str], ModuleType] = importlib.import_module) -> list[str]:
    """Each requirement that does not hold, as "<module.path> (<what is wrong>; used by <module>)"."""
    problems: list[str] = []
    for private in required:
        problem = _problem(private, import_module)
        if problem:
            problems.append(f"{private} ({problem}; used by processors.runtime.{private.used_by})")
    return problems


def check(required: tuple[Private, ...] = REQUIRED,
          import_module: Callable[[str], ModuleType] = importlib.import_module) -> dict[str, str]:
    """Verify every requirement; return the installed versions, or raise `IncompatibleRuntime`
    naming each missing internal and the versions. Versions other than `TESTED` are logged."""
    installed = versions(import_module)
    problems = missing(required, import_module)
    described = ", ".join(f"{name} {version}" for name, version in installed.items())
    tested = ", ".join(f"{name} {version}" for name, version in TESTED.items())
    if problems:
        raise IncompatibleRuntime(
            f"the processor runtime (processors/runtime/) needs internals that the installed {described} "
            f"lack (written for {tested}): " + "; ".join(problems))
    if installed != TESTED:
        log.warning("processor runtime: installed %s, tested with %s; every internal it uses is present",
                    described, tested)
    return installed


@functools.cache
def check_installed() -> dict[str, str]:
    """`check()` against the installed libraries, once per process (they cannot change meanwhile)."""
    return check()


def _problem(private: Private, import_module: Callable[[str], ModuleType]) -> str | None:
    try:
        owner: Any = import_module(private.module)
    except ImportError as exc:
        return f"module not importable: {exc}"
    parts = private.path.split(".")
    attribute_parts = parts[:-1] if private.in_init else parts
    for depth, part in enumerate(attribute_parts):
        if not hasattr(owner, part):
            return f"no attribute {'.'.join(attribute_parts[:depth + 1])!r}"
        owner = getattr(owner, part)
    if private.in_init:
        if not any(parts[-1] in _names(klass.__dict__.get("__init__")) for klass in getattr(owner, "__mro__", ())):
            return f"{parts[-1]!r} is no longer set by {'.'.join(parts[:-1])}.__init__"
    unread = [name for name in private.reads if name not in _names(owner)]
    if unread:
        return f"no longer uses {', '.join(unread)}"
    return None


def _names(function: Any) -> tuple[str, ...]:
    """The global and attribute names a function's code uses (empty for non-Python callables)."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return code.co_names if code is not None else ()
