"""LMCache's remote URL schemes against real stores: redis-sentinel:// through a real failover,
redis-cluster:// on a real 3-master cluster, valkey:// on a real redis-server."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from lmcached.storage.base import Block
from lmcached.storage.remote import RemoteBackend, make_connector
from lmcached.testing import DaemonProcess, RedisServer, wait_until

SERVICE = "mymaster"
KiB = 1 << 10


def _value(i: int) -> bytes:
    return bytes([i % 251]) * (64 * KiB)


def _has(port: int, key: bytes) -> bool:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        return bool(client.exists(b"lmcached:" + key))
    except redis.ConnectionError:
        return False
    finally:
        client.close()


class SentinelProcess(RedisServer):
    """One real Redis Sentinel (``redis-server sentinel.conf --sentinel``) watching a master.

    Only the command line differs from a RedisServer (a sentinel needs its config file first);
    the free port, the PING wait and stop() are RedisServer's.
    """

    def __init__(self, folder: Path, master_port: int) -> None:
        super().__init__(folder)
        self.conf = folder / "sentinel.conf"
        # Quorum 1 and a 1 s down-after: one sentinel may fail the master over, soon.
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )

    def start(self, timeout: float = 15.0) -> SentinelProcess:
        self.proc = subprocess.Popen(
            [self.binary, str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout, what="redis sentinel to answer")
        return self

    def _client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=1, decode_responses=True)

    def master_port(self) -> int | None:
        try:
            addr = self._client().execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        except redis.ConnectionError:
            return None
        return int(addr[1]) if addr else None

    def knows_replicas(self) -> bool:
        try:
            return bool(self._client().execute_command("SENTINEL", "replicas", SERVICE))
        except redis.ResponseError:
            return False


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelProcess]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    master = RedisServer(tmp_path / "master")
    replica = RedisServer(
        tmp_path / "replica", extra_args=["--replicaof", "127.0.0.1", str(master.port)]
    )
    sentinel = SentinelProcess(tmp_path / "sentinel", master.port)
    try:
        master.start()
        replica.start()
        sentinel.start()
        wait_until(sentinel.knows_replicas, 30, what="the sentinel to discover the replica")
        yield master, replica, sentinel
    finally:
        sentinel.stop()
        replica.stop()
        master.stop()


def test_redis_sentinel_failover_client_calls_work_before_and_after(
    tmp_path: Path, sentinel_group: tuple[RedisServer, RedisServer, SentinelProcess]
) -> None:
    master, replica, sentinel = sentinel_group
    before, after = b"sentinel/before", b"sentinel/after"
    daemon = DaemonProcess(
        tmp_path / "d",
        num_workers=1,
        remote_url=f"redis-sentinel://127.0.0.1:{sentinel.port}/{SERVICE}",
        remote_timeout=0.5,
        remote_backoff_max=0.5,
    )

    def stored(key: bytes, value: bytes, port: int) -> bool:
        # While the remote tier backs off from a failure (a dead master, a first connection), a
        # put's remote copy is dropped and counted, so put again until the server holds it.
        with daemon.client(timeout=10) as c:
            c.put([key], [value])
            c.flush()
            assert [bytes(v) for v in c.get([key])] == [value]
        return _has(port, key)

    def both_served() -> bool:
        with daemon.client(timeout=10) as c:
            got = c.get([before, after])
        return [bytes(v) if v is not None else None for v in got] == [_value(1), _value(2)]

    with daemon:
        wait_until(lambda: stored(before, _value(1), master.port), 60, what="a put to the master")
        wait_until(lambda: _has(replica.port, before), 30, what="replication to the replica")

        master.proc.kill()  # type: ignore[union-attr]  # a crash, not a clean shutdown
        wait_until(
            lambda: sentinel.master_port() == replica.port,
            60,
            what="the sentinel to promote the replica",
        )
        # The same connector, after the failover: it asks the sentinel again.
        wait_until(
            lambda: stored(after, _value(2), replica.port), 60, what="a put to the new master"
        )

        # A fresh CPU tier: both blocks now come from the promoted master, through the sentinel.
        daemon.stop()
        daemon.start()
        wait_until(both_served, 60, what="both blocks from the promoted master")
        with daemon.client(timeout=10) as c:
            assert c.stats()["totals"]["remote"]["hits"] == 2


def test_redis_cluster_url_in_lmcache_spelling_round_trips(redis_cluster) -> None:
    url = redis_cluster.url.replace("redis+cluster://", "redis-cluster://")
    remote = RemoteBackend(make_connector(url, timeout=1.0))
    try:
        keys = [f"lmcache-spelling/{i}".encode() for i in range(12)]
        blocks = [Block.from_bytes(_value(i), {"i": i}) for i in range(12)]
        assert remote.put_many(list(zip(keys, blocks, strict=True))) == [True] * 12
        got = remote.get_many(keys)
        assert [g.tobytes() if g else None for g in got] == [b.tobytes() for b in blocks]
        sizes = [redis.Redis(port=n.port).dbsize() for n in redis_cluster.nodes]
        assert sum(1 for s in sizes if s) >= 2  # really spread over the cluster's masters
    finally:
        remote.close()


def test_valkey_url_is_redis_under_another_name(tmp_path: Path, redis_server) -> None:
    url = f"valkey://127.0.0.1:{redis_server.port}/0"
    daemon = DaemonProcess(tmp_path / "d", num_workers=1, remote_url=url)

    def stored() -> bool:
        with daemon.client(timeout=10) as c:
            c.put([b"valkey/k"], [_value(3)])
            c.flush()
        return _has(redis_server.port, b"valkey/k")

    with daemon:
        wait_until(stored, 60, what="a put to reach the server named by valkey://")
