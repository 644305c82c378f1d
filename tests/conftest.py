from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.embedded import EmbeddedRedis
from shared.settings import Settings
from tests.harness import Cluster, demo_http_server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One embedded Valkey for the session; tests isolate by namespace."""
    server = EmbeddedRedis(Settings(state_dir=str(tmp_path_factory.mktemp("redis-state"))))
    url = server.start(publish=False)
    yield url
    server.stop()


@pytest.fixture(scope="session")
def demo_http_url() -> Iterator[str]:
    with demo_http_server() as url:
        yield url


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def stop_workers() -> Iterator[list[Cluster]]:
    """Clusters registered here have their workers stopped at teardown, pass or fail."""
    clusters: list[Cluster] = []
    yield clusters
    for cluster in clusters:
        cluster.stop_workers()
