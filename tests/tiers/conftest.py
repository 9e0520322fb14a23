"""Fixtures for the tier tests: a real redis-server, and a real 3-master Redis Cluster."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

# Daemon subprocesses must import this checkout, not whichever tree `pip install -e` points at.
REPO_ROOT = str(Path(__file__).resolve().parents[2])
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p
)

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """Return a free port p <= 55535 whose cluster bus port p + 10000 is free too."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a redis cluster node")


class ClusterNodeProcess:
    """One cluster-enabled redis-server in its own folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_cluster_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, what=f"redis cluster node on {self.port}")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _cluster_state(client: redis.Redis) -> str:
    info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    if isinstance(info, dict):
        state = info.get("cluster_state", info.get(b"cluster_state", ""))
    else:
        text = info.decode() if isinstance(info, bytes) else str(info)
        state = "ok" if "cluster_state:ok" in text else "fail"
    return state.decode() if isinstance(state, bytes) else str(state)


class RedisClusterFixture:
    """Three masters, no replicas, created with redis-cli --cluster create."""

    def __init__(self, folder: Path) -> None:
        self.nodes = [ClusterNodeProcess(folder / f"n{i}") for i in range(3)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [REDIS_CLI or "redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        for node in self.nodes:
            client = redis.Redis(port=node.port, socket_timeout=1)
            wait_for(
                lambda c=client: _cluster_state(c) == "ok",
                timeout=30,
                what="cluster_state:ok",
            )
            client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


try:  # the core's fixture process, once it exists
    from lmcached.testing import RedisServer
except ImportError:  # pragma: no cover - until the core lands

    class RedisServer:  # type: ignore[no-redef]
        """A standalone redis-server on a free loopback port (fallback until lmcached.testing)."""

        def __init__(self, workdir: Path) -> None:
            self.folder = Path(workdir)
            self.port = free_port()
            self.proc: subprocess.Popen[bytes] | None = None

        @property
        def url(self) -> str:
            return f"redis://127.0.0.1:{self.port}/0"

        def start(self) -> RedisServer:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.proc = subprocess.Popen(
                [REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            client = redis.Redis(port=self.port, socket_timeout=1)

            def up() -> bool:
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    return False

            wait_for(up, what="redis-server")
            client.close()
            return self

        def stop(self) -> None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterFixture]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli are not installed")
    cluster = RedisClusterFixture(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LMCACHED_"):
            monkeypatch.delenv(name)
