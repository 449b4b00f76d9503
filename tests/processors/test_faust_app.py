"""The processor's faust app uses a consumer whose fetches do not wait 1.5 s on idle partitions."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postback.config import ProcessOptions, Settings
from postback.partners import PartnerConfig
from processors.app import create_app
from processors.faust_app import FETCH_MAX_WAIT_MS


def test_the_aiokafka_consumer_gets_the_short_fetch_wait(tmp_path: Path) -> None:
    async def built_wait() -> int:
        app = create_app(Settings.from_env(), "127.0.0.1:1", PartnerConfig.empty(), ProcessOptions(), tmp_path)
        consumer = app.consumer._thread._create_worker_consumer(app.transport)  # built as faust builds it
        try:
            return consumer._fetch_max_wait_ms
        finally:
            await consumer.stop()

    wait = asyncio.run(built_wait())
    assert wait == FETCH_MAX_WAIT_MS and wait < 1500  # faust's own hard-coded value is 1500
