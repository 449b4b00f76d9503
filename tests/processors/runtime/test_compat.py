"""`processors.runtime.compat`: every faust/aiokafka internal the runtime uses is verified,
and a missing one is named, with the installed versions. Fake modules stand in for a
changed release; the real modules are never altered."""

from __future__ import annotations

import importlib
import logging
import types
from collections.abc import Callable

import pytest

from processors.runtime import compat
from processors.runtime.compat import IncompatibleRuntime, Private


def _importing(*fakes: types.ModuleType) -> Callable[[str], types.ModuleType]:
    """`importlib.import_module`, except for the modules faked here (by their `__name__`)."""
    by_name = {module.__name__: module for module in fakes}
    return lambda name: by_name[name] if name in by_name else importlib.import_module(name)


def _module(name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def test_the_installed_versions_have_every_internal() -> None:
    assert compat.missing() == []
    assert compat.check() == compat.versions() == {"faust": "0.15.3", "aiokafka": "0.14.0"}
    assert compat.check_installed() == compat.versions()


def test_every_runtime_module_that_uses_internals_is_covered() -> None:
    users = {private.used_by for private in compat.REQUIRED}
    assert {"app", "consumer", "context", "tables", "publish"} <= users


def test_a_missing_module_attribute_is_named_with_the_versions() -> None:
    streams = _module("faust.streams")  # `_current_event` is gone
    with pytest.raises(IncompatibleRuntime) as raised:
        compat.check(import_module=_importing(streams))
    message = str(raised.value)
    assert "faust.streams._current_event (no attribute '_current_event'; used by processors.runtime.context)" \
        in message
    assert "faust 0.15.3" in message and "aiokafka 0.14.0" in message
    assert message.count("used by") == 1  # nothing else is reported


def test_a_missing_method_is_named() -> None:
    real = importlib.import_module("faust.stores.rocksdb").Store
    kept = ("_decode_key", "_decode_value", "set_persisted_offset", "offset_key", "__init__")
    store = type("Store", (), {name: getattr(real, name) for name in kept})  # `_db_for_partition` is gone
    fake = _module("faust.stores.rocksdb", Store=store)
    assert compat.missing(import_module=_importing(fake)) == [
        "faust.stores.rocksdb.Store._db_for_partition (no attribute 'Store._db_for_partition'; "
        "used by processors.runtime.tables)"]


def test_an_instance_attribute_no_longer_set_by_init_is_named() -> None:
    class Consumer:
        def __init__(self) -> None:
            self._acked_offsets: list[int] = []  # renamed

    required = (Private("fake.driver", "Consumer._acked", "consumer", in_init=True),)
    fake = _module("fake.driver", Consumer=Consumer)
    with pytest.raises(IncompatibleRuntime, match=r"fake\.driver\.Consumer\._acked \('_acked' is no longer set "
                                                  r"by Consumer.__init__; used by processors.runtime.consumer\)"):
        compat.check(required, import_module=_importing(fake))


def test_a_function_that_no_longer_reads_what_the_runtime_relies_on_is_named() -> None:
    def on_key_set(self: object, key: object, value: object) -> None:
        self.send_changelog(key, value)  # type: ignore[attr-defined]  # no longer reads .message.partition

    required = (Private("fake.table", "on_key_set", "tables", reads=("send_changelog", "message", "partition")),)
    fake = _module("fake.table", on_key_set=on_key_set)
    assert compat.missing(required, lambda name: fake) == [
        "fake.table.on_key_set (no longer uses message, partition; used by processors.runtime.tables)"]


def test_another_version_with_every_internal_starts_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    real = importlib.import_module("faust")
    newer = _module("faust", __version__="0.99.0", App=real.App, Table=real.Table)
    with caplog.at_level(logging.WARNING, logger="processors.runtime"):
        installed = compat.check(import_module=_importing(newer))
    assert installed == {"faust": "0.99.0", "aiokafka": "0.14.0"}
    assert "installed faust 0.99.0, aiokafka 0.14.0, tested with faust 0.15.3" in caplog.text
