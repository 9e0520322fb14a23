"""The tiers inside a real daemon: persistence, crashes, corruption, a dead Redis, sharing.

Every test runs `lmcached start` as a subprocess (lmcached.testing.DaemonProcess) and, where a
remote is involved, a real redis-server on a free loopback port.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from lmcached.storage.blockfile import file_name
from lmcached.testing import DaemonProcess, wait_until

KiB = 1 << 10
MiB = 1 << 20


def _value(i: int, size: int = 256 * KiB) -> bytes:
    return bytes([i % 251]) * (size - 8) + i.to_bytes(8, "little")


def _keys(n: int, prefix: str = "ns/m@0/any/") -> list[bytes]:
    return [f"{prefix}{i:08x}".encode() for i in range(n)]


def _totals(client) -> dict:
    return client.stats()["totals"]


def _disk_daemon(tmp_path: Path, **kw) -> DaemonProcess:
    values = {
        "local_disk": str(tmp_path / "disk"),
        "max_local_disk_size": "64MiB",
        "num_workers": 2,
    }
    values.update(kw)
    return DaemonProcess(tmp_path / "d", **values)


def _get_all(client, keys: list[bytes]) -> list[bytes | None]:
    return [None if v is None else bytes(v) for v in client.get(keys)]


def test_restart_serves_every_block_from_disk(tmp_path: Path) -> None:
    keys = _keys(24)
    daemon = _disk_daemon(tmp_path)
    with daemon:
        with daemon.client() as c:
            c.put(keys, [_value(i) for i in range(len(keys))])
            c.flush()
        daemon.stop()
        daemon.start()
        with daemon.client() as c:
            assert _get_all(c, keys) == [_value(i) for i in range(len(keys))]
            totals = _totals(c)
            assert totals["disk"]["hits"] == len(keys) and totals["cpu"]["hits"] == 0
            # Promoted: a second read is served from CPU.
            assert _get_all(c, keys[:4]) == [_value(i) for i in range(4)]
            assert _totals(c)["cpu"]["hits"] == 4


def test_sigterm_drains_queued_writes_before_exit(tmp_path: Path) -> None:
    keys = _keys(40)
    daemon = _disk_daemon(tmp_path, shutdown_flush_timeout=20)
    with daemon:
        with daemon.client() as c:
            c.put(keys, [_value(i) for i in range(len(keys))])  # no flush: stop right away
        daemon.stop()
        daemon.start()
        with daemon.client() as c:
            assert _get_all(c, keys) == [_value(i) for i in range(len(keys))]


def test_kill9_keeps_every_flushed_block_and_serves_nothing_wrong(tmp_path: Path) -> None:
    flushed, late = _keys(20), _keys(20, "late/")
    daemon = _disk_daemon(tmp_path)
    with daemon:
        with daemon.client() as c:
            c.put(flushed, [_value(i) for i in range(20)])
            c.flush()
            c.put(late, [_value(100 + i) for i in range(20)])  # may or may not reach disk
        daemon.kill9()
        daemon.start()
        with daemon.client() as c:
            assert _get_all(c, flushed) == [_value(i) for i in range(20)]
            for i, v in enumerate(_get_all(c, late)):
                assert v is None or v == _value(100 + i)


def test_corrupt_and_truncated_disk_files_are_counted_misses(tmp_path: Path) -> None:
    keys = _keys(3)
    daemon = _disk_daemon(tmp_path, num_workers=1)
    with daemon:
        with daemon.client() as c:
            c.put(keys, [_value(i) for i in range(3)])
            c.flush()
        daemon.stop()
        shard = tmp_path / "disk" / "0"
        flipped = shard / file_name(keys[0])
        data = bytearray(flipped.read_bytes())
        data[len(data) // 2] ^= 0x40
        flipped.write_bytes(bytes(data))
        truncated = shard / file_name(keys[1])
        os.truncate(truncated, truncated.stat().st_size // 2)
        daemon.start()
        with daemon.client() as c:
            assert _get_all(c, keys) == [None, None, _value(2)]
            assert _totals(c)["disk"]["checksum_failures"] == 2


def test_corrupt_redis_value_is_a_counted_miss(tmp_path: Path, redis_server) -> None:
    key = _keys(1)[0]
    # A generous remote_timeout: on a loaded machine a 1 s deadline can fail this one write,
    # which the tier then drops by design; this test is about corruption, not timeouts.
    with DaemonProcess(
        tmp_path / "d", remote_url=redis_server.url, num_workers=1, remote_timeout=10
    ) as daemon:
        with daemon.client() as c:
            c.put([key], [_value(1)])
            c.flush()
        raw = redis.Redis(port=redis_server.port)
        stored = bytearray(raw.get(b"lmcached:" + key))
        stored[-1] ^= 0x01
        raw.set(b"lmcached:" + key, bytes(stored))
        daemon.stop()  # empties CPU, so the read has to come from Redis
        daemon.start()
        with daemon.client() as c:
            assert c.get([key]) == [None]
            assert _totals(c)["remote"]["checksum_failures"] == 1
        status = subprocess.run(
            [sys.executable, "-m", "lmcached", "status", "--config", str(daemon.config_path)],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        remote_row = next(line for line in status.splitlines() if " remote " in line)
        assert remote_row.split()[-1] == "ok" and remote_row.split()[-3] == "1"


def test_num_workers_change_keeps_every_block_reachable(tmp_path: Path) -> None:
    keys = _keys(30)
    with _disk_daemon(tmp_path, num_workers=2) as daemon, daemon.client() as c:
        c.put(keys, [_value(i) for i in range(30)])
        c.flush()
    with (
        DaemonProcess(
            tmp_path / "d3",
            local_disk=str(tmp_path / "disk"),
            max_local_disk_size="64MiB",
            num_workers=3,
        ) as daemon,
        daemon.client() as c,
    ):
        assert _get_all(c, keys) == [_value(i) for i in range(30)]
        assert _totals(c)["disk"]["files_moved_in"] > 0


def test_two_daemons_share_one_redis(tmp_path: Path, redis_server) -> None:
    keys = _keys(6)
    with DaemonProcess(tmp_path / "a", remote_url=redis_server.url) as a, a.client() as ca:
        ca.put(keys, [_value(i) for i in range(6)])
        ca.flush()
        with DaemonProcess(tmp_path / "b", remote_url=redis_server.url, num_workers=3) as b:
            with b.client() as cb:
                assert _get_all(cb, keys) == [_value(i) for i in range(6)]
                assert _totals(cb)["remote"]["hits"] == 6
                assert cb.delete(keys[:1]) == 1
            assert ca.get(keys[:1]) == [_value(0)]  # still in A's CPU tier...
            assert not redis.Redis(port=redis_server.port).exists(b"lmcached:" + keys[0])


@pytest.mark.parametrize("store", ["redis_cluster", "shared_folder"])
def test_two_daemons_share_a_cluster_or_a_shared_folder(
    tmp_path: Path, request: pytest.FixtureRequest, store: str
) -> None:
    if store == "redis_cluster":
        url = request.getfixturevalue("redis_cluster").url
    else:
        (tmp_path / "shared").mkdir()
        url = f"fs://{tmp_path}/shared"
    keys = _keys(5, f"{store}/")
    with DaemonProcess(tmp_path / "a", remote_url=url) as a, a.client() as ca:
        ca.put(keys, [_value(i) for i in range(5)])
        ca.flush()
        # B has more workers than A, and compresses: the purge, fanned out to each of B's
        # workers, still counts every shared key once.
        b = DaemonProcess(tmp_path / "b", remote_url=url, num_workers=3, remote_codec="zstd")
        with b, b.client() as cb:
            assert _get_all(cb, keys) == [_value(i) for i in range(5)]
            assert _totals(cb)["remote"]["hits"] == 5
            assert cb.purge(f"{store}/".encode()) == 5
        assert ca.delete(keys) == 5  # A's CPU copies; the remote ones are gone already


def test_redis_down_mid_run_serves_cpu_and_disk_then_recovers(tmp_path: Path, redis_server) -> None:
    in_cpu, on_disk, remote_only = _keys(2, "cpu/"), _keys(2, "disk/"), _keys(2, "remote/")
    daemon = DaemonProcess(
        tmp_path / "d",
        num_workers=1,
        local_disk=str(tmp_path / "disk"),
        max_local_disk_size="64MiB",
        remote_url=redis_server.url,
        remote_timeout=0.5,
        remote_backoff_max=0.5,
    )
    with daemon:
        with daemon.client() as c:
            c.put(on_disk + remote_only, [_value(i) for i in range(2)] + [_value(20), _value(21)])
            c.flush()
        # After a restart CPU is empty; removing the remote-only keys' files leaves them in Redis
        # alone.
        daemon.stop()
        for k in remote_only:
            (tmp_path / "disk" / "0" / file_name(k)).unlink()
        daemon.start()
        with daemon.client() as c:
            assert _get_all(c, remote_only) == [_value(20), _value(21)]
            assert _totals(c)["remote"]["hits"] == 2
            c.delete(remote_only[1:])
        redis_server.stop()
        with daemon.client(timeout=10) as c:
            assert _get_all(c, on_disk) == [_value(i) for i in range(2)]
            c.put(in_cpu, [_value(10 + i) for i in range(2)])
            assert _get_all(c, in_cpu) == [_value(10 + i) for i in range(2)]
            c.delete(remote_only)  # drop the promoted CPU copies; the remote is down
            assert c.get(remote_only) == [None, None]  # a miss, within the client's timeout
            remote = _totals(c)["remote"]
            assert remote["unavailable"] + remote["skipped_while_down"] >= 1
            status = c.stats()["workers"][0]["stats"]["store"]["remote"]
            assert status["health"] == "down"
            redis_server.start()  # empty: a fresh Redis without persistence
            c.put(remote_only[:1], [_value(20)])
            wait_until(
                lambda: (
                    c.put(remote_only[:1], [_value(20)]) is None
                    and c.stats()["workers"][0]["stats"]["store"]["remote"]["health"] == "ok"
                ),
                timeout=20,
                what="the remote tier to be used again",
            )
            c.flush()
            assert redis.Redis(port=redis_server.port).exists(b"lmcached:" + remote_only[0])


def test_remote_read_does_not_block_cpu_hits(tmp_path: Path, redis_server) -> None:
    daemon = DaemonProcess(
        tmp_path / "d", num_workers=1, remote_url=redis_server.url, remote_timeout=5.0
    )
    with daemon, daemon.client(timeout=20) as c:
        c.put([b"hot"], [_value(1)])
        redis_server.proc.send_signal(19)  # SIGSTOP: Redis accepts nothing and answers nothing
        try:
            slow = threading.Thread(target=lambda: c2.get([b"cold"]))
            with daemon.client(timeout=20) as c2:
                slow.start()
                gets = lambda: c.stats()["workers"][0]["stats"]["ops"]["requests"].get("get", 0)  # noqa: E731
                wait_until(lambda: gets() >= 1, 10, what="the slow get to reach the worker")
                assert slow.is_alive()
                assert _get_all(c, [b"hot"]) == [_value(1)]  # served while the remote read hangs
                assert slow.is_alive()
                redis_server.proc.send_signal(18)
                slow.join(20)
        finally:
            redis_server.proc.send_signal(18)  # SIGCONT


@pytest.mark.parametrize("failure", ["tiny_budget", "unwritable"])
def test_full_or_failing_disk_is_counted_and_the_daemon_keeps_serving(
    tmp_path: Path, failure: str
) -> None:
    disk = tmp_path / "disk"
    kw = {"max_local_disk_size": "1MiB", "num_workers": 1}
    daemon = _disk_daemon(tmp_path, **kw)
    with daemon, daemon.client() as c:
        if failure == "unwritable":
            shard = disk / "0"
            for f in shard.iterdir():
                f.unlink()
            shard.rmdir()
            shard.write_bytes(b"a file where the shard folder was")
        keys = _keys(12)
        c.put(keys, [_value(i) for i in range(12)])
        c.flush()
        assert _get_all(c, keys) == [_value(i) for i in range(12)]  # CPU still has them
        d = _totals(c)["disk"]
        if failure == "tiny_budget":
            assert d["evictions"] > 0 and d["used_bytes"] <= 1 * MiB
        else:
            assert d["write_errors"] == 12
        c.ping()
