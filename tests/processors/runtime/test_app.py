"""`processors.runtime.app`: the app `create_app` assembles, with a consumer whose fetches do not
wait 1.5 s on idle partitions."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postback.config import ProcessOptions, Settings
from postback.partners import PartnerConfig
from postback.topics import Topics
from processors.app import TABLES, changelog_topics, create_app
from processors.runtime.app import FETCH_MAX_WAIT_MS


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


def test_create_app_assembles_the_five_agents_on_their_topics_and_the_four_tables(tmp_path: Path) -> None:
    settings = Settings.from_env()
    app = create_app(settings, "127.0.0.1:1", PartnerConfig.empty(), ProcessOptions(), tmp_path)
    topics = Topics(settings.topic_prefix)
    subscribed = {name: set(agent.channel.topics) for name, agent in app.agents.items()}  # type: ignore[attr-defined]
    assert subscribed == {
        "processors.app.verify": {topics.raw_postbacks.name},
        "processors.app.dedupe": {topics.processor_dedupe.name},
        "processors.app.attribute": {topics.processor_attribute.name},
        "processors.app.clicks": {topics.clicks.name},
        "processors.app.commission": {topics.processor_commission.name},
    }
    assert sorted(app.tables) == sorted(TABLES) == ["clicks", "commission", "dedupe", "pending"]
    assert sorted(table.changelog_topic.get_topic_name() for table in app.tables.values()) == \
        sorted(spec.name for spec in changelog_topics(settings, ProcessOptions()))
    assert app.conf.processing_guarantee.value == "at_least_once"
    assert "/metrics" in app.web.views
