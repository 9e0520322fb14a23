"""Fixtures for the tier tests: a real 3-master Redis Cluster (redis_server is the shared one)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from lmcached.storage import piece_copy
from lmcached.storage.peer_memory import PeerMemory
from lmcached.testing import RedisServer, wait_until

# Daemon subprocesses must import this checkout, not whichever tree `pip install -e` points at.
REPO_ROOT = str(Path(__file__).resolve().parents[2])
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    """Two copy threads, as a worker's."""
    pool = ThreadPoolExecutor(piece_copy.COPY_THREADS)
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def me() -> Iterator[PeerMemory]:
    """This very process as a direct put's client: process_vm_readv of one's own pid works."""
    peer = PeerMemory(os.getuid(), os.getpid())
    yield peer
    peer.close()


REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


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


def _answers(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
    finally:
        client.close()


class ClusterNodeProcess(RedisServer):
    """One cluster-enabled redis-server in its own folder (the cluster bus uses port + 10000)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(
            folder,
            port=free_cluster_port(),
            extra_args=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000"],
        )  # fmt: skip


def _cluster_state(port: int) -> str:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    finally:
        client.close()
    if isinstance(info, dict):
        state = info.get("cluster_state", info.get(b"cluster_state", ""))
    else:
        text = info.decode() if isinstance(info, bytes) else str(info)
        state = "ok" if "cluster_state:ok" in text else "fail"
    return state.decode() if isinstance(state, bytes) else str(state)


class RedisClusterFixture:
    """Three masters, no replicas, created with redis-cli --cluster create (no stdin in CI)."""

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
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, timeout=30,
        )  # fmt: skip
        for node in self.nodes:
            wait_until(lambda n=node: _cluster_state(n.port) == "ok", 30, what="cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


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
    # An LMCACHED_* variable in the developer's shell would change every daemon under test.
    for name in list(os.environ):
        if name.startswith("LMCACHED_"):
            monkeypatch.delenv(name)
