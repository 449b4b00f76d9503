"""Fetch the Apache Kafka broker jars from Maven Central with `mvn`, once per user.

Why Maven: this project's machines reach Maven Central but not the Apache download
mirrors, and Maven resolves the exact runtime closure of `kafka_2.13` for the pinned
version. The result is cached under `<cache_dir>/kafka-<version>/libs` and marked
complete only after every jar arrived, so an interrupted download is retried, never
half-used. A file lock makes concurrent callers (parallel test sessions) wait for
one download instead of racing.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

POM = Path(__file__).with_name("kafka") / "pom.xml"
_MARKER = ".complete"


class KafkaJarsError(RuntimeError):
    """Maven could not resolve the broker jars; the message carries the command and its output."""


def jars_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"kafka-{version}" / "libs"


def jars_present(cache_dir: Path, version: str) -> bool:
    return (jars_dir(cache_dir, version) / _MARKER).exists()


def ensure_jars(cache_dir: Path, version: str, progress: Callable[[str], None] = lambda _msg: None) -> Path:
    """Return the directory holding the broker's classpath, downloading it if needed."""
    target = jars_dir(cache_dir, version)
    if (target / _MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _MARKER).exists():
            return target
        _download(target, version, progress)
    return target


def _download(target: Path, version: str, progress: Callable[[str], None]) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaJarsError("`mvn` (Apache Maven) is not on PATH; install it (apt-get install maven)")
    staging = target.with_name("libs.partial")
    shutil.rmtree(staging, ignore_errors=True)
    cmd = [
        mvn, "-B", "-f", str(POM), f"-Dkafka.version={version}",
        "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
    ]
    progress(f"resolving Apache Kafka {version} jars from Maven Central (once) ...")
    output: list[str] = []
    downloaded = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line.rstrip())
        if "Downloaded from" in line:
            downloaded += 1
            if downloaded % 10 == 0:
                name = line.rsplit("/", 1)[-1].split(" ")[0]
                progress(f"  {downloaded} artifacts downloaded (latest: {name})")
    rc = proc.wait(timeout=900)
    if rc != 0:
        tail = "\n".join(output[-25:])
        raise KafkaJarsError(f"mvn failed with exit code {rc}: {' '.join(cmd)}\n{tail}")
    jars = list(staging.glob("*.jar"))
    if not any(j.name.startswith("kafka_2.13-") for j in jars):
        raise KafkaJarsError(f"mvn succeeded but no kafka_2.13 jar landed in {staging}")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (target / _MARKER).write_text(version + "\n")
    progress(f"  {len(jars)} jars ready in {target}")
