"""Shared fixtures: real lmcached daemons and real redis-servers, cleaned up after each use."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcached.testing import DaemonProcess, RedisServer

# Registries, example plugin packages and the CLI runner, shared by the extension and codec tests.
pytest_plugins = ["extension_fixtures"]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start daemons with config overrides; every one is stopped at the end of the test."""
    started: list[DaemonProcess] = []

    def make(start: bool = True, **overrides: Any) -> DaemonProcess:
        d = DaemonProcess(tmp_path / f"d{len(started)}", **overrides)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.close()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for a whole module of tests that don't disturb it."""
    with DaemonProcess(
        tmp_path_factory.mktemp("shared"), num_workers=2, max_local_cpu_size="1GiB"
    ) as d:
        yield d


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as r:
        yield r
