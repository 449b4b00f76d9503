from pathlib import Path

from postback.config import KAFKA_VERSION, Settings


def test_defaults_without_environment(tmp_path: Path) -> None:
    s = Settings.from_env({"XDG_CACHE_HOME": str(tmp_path)})
    assert s.kafka_bootstrap_servers is None and s.clickhouse_url is None
    assert s.state_dir == Path(".postback").absolute()
    assert s.cache_dir == tmp_path / "postback-pipeline"
    assert s.topic_prefix == "postback" and s.kafka_version == KAFKA_VERSION == "4.1.1"


def test_environment_overrides(tmp_path: Path) -> None:
    s = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "CLICKHOUSE_URL": "http://c:8123",
                           "POSTBACK_STATE_DIR": str(tmp_path / "st"), "POSTBACK_CACHE_DIR": str(tmp_path / "c"),
                           "POSTBACK_CONFIG": str(tmp_path / "p.toml"), "POSTBACK_TOPIC_PREFIX": "acme"})
    assert (s.kafka_bootstrap_servers, s.clickhouse_url) == ("k:9092", "http://c:8123")
    assert s.state_dir == tmp_path / "st" and s.cache_dir == tmp_path / "c"
    assert s.config_file == tmp_path / "p.toml" and s.topic_prefix == "acme"


def test_kafka_version_matches_the_pom_default() -> None:
    pom = (Path(__file__).parents[2] / "deploy" / "kafka" / "pom.xml").read_text()
    assert f"<kafka.version>{KAFKA_VERSION}</kafka.version>" in pom
