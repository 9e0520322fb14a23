"""Remote tiers against real stores: redis-server, a 3-master Redis Cluster, a shared folder."""

from __future__ import annotations

import time

import pytest
import redis

from lmcached.storage.base import Block
from lmcached.storage.remote import RemoteBackend, make_connector
from lmcached.storage.remote.redis_connector import glob_escape, parse_cluster_url
from lmcached.testing import wait_until

MiB = 1 << 20


def _block(i: int, size: int = 32 * 1024) -> Block:
    return Block.from_bytes(bytes([i % 251]) * size, {"i": i})


def _remote(url: str, **kw) -> RemoteBackend:
    return RemoteBackend(make_connector(url, timeout=1.0), **kw)


def _round_trip(remote: RemoteBackend) -> None:
    keys = [f"ns/m@0/any/{i:04x}".encode() for i in range(20)]
    assert remote.put_many([(k, _block(i)) for i, k in enumerate(keys)]) == [True] * 20
    assert remote.contains_many([keys[0], b"absent"]) == [True, False]
    got = remote.get_many([*keys, b"absent"])
    assert [g.tobytes() if g else None for g in got] == [
        *(_block(i).tobytes() for i in range(20)),
        None,
    ]
    assert got[3].meta == {"i": 3}
    assert sorted(remote.iter_keys()) == sorted(keys)
    assert remote.remove(keys[0]) and remote.get(keys[0]) is None
    assert remote.remove_prefix(b"ns/m@0/any/000") == 15  # 0001..000f; 0000 is already gone
    assert sorted(remote.iter_keys()) == keys[16:]
    stats = remote.stats()
    assert stats["health"] == "ok" and stats["hits"] == 20 and stats["checksum_failures"] == 0
    remote.close()
    remote.close()


def test_redis_round_trip(redis_server) -> None:
    _round_trip(_remote(redis_server.url))


def test_fs_round_trip(tmp_path) -> None:
    (tmp_path / "shared").mkdir()
    _round_trip(_remote(f"fs://{tmp_path}/shared"))


def test_cluster_round_trip_spreads_keys_over_masters(redis_cluster) -> None:
    remote = _remote(redis_cluster.url)
    _round_trip(remote)
    remote = _remote(redis_cluster.url)
    remote.put_many([(f"spread/{i}".encode(), _block(i, 1024)) for i in range(60)])
    sizes = [redis.Redis(port=n.port).dbsize() for n in redis_cluster.nodes]
    assert all(s > 0 for s in sizes), sizes
    assert remote.remove_prefix(b"spread/") == 60
    remote.close()


def test_cluster_url_parsing() -> None:
    nodes, opts = parse_cluster_url("rediss+cluster://u:p%40ss@h1:7000,[::1]:7001?x=1")
    assert nodes == [("h1", 7000), ("::1", 7001)]
    assert opts == {"username": "u", "password": "p@ss", "x": "1", "ssl": True}
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url("redis+cluster://h1")


def test_unknown_scheme_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="redis\\+cluster"):
        make_connector("memcached://x", timeout=1)


def test_prefix_ttl_and_glob_characters(redis_server) -> None:
    remote = _remote(redis_server.url, key_prefix=b"team-a:", ttl=60)
    remote.put(b"we*ird[key]", _block(1))
    raw = redis.Redis(port=redis_server.port)
    assert raw.exists(b"team-a:we*ird[key]")
    assert 0 < raw.pttl(b"team-a:we*ird[key]") <= 60_000
    raw.set(b"team-a:wexxird", b"not ours")  # matched by an unescaped glob, not by ours
    assert list(remote.iter_keys()) == [b"we*ird[key]", b"wexxird"] or sorted(
        remote.iter_keys()
    ) == sorted([b"we*ird[key]", b"wexxird"])
    assert remote.remove_prefix(b"we*") == 1
    assert raw.exists(b"team-a:wexxird")
    assert glob_escape(b"a*b?[c]\\") == b"a\\*b\\?\\[c\\]\\\\"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_redis_value_is_a_counted_miss_and_deleted(redis_server, damage: str) -> None:
    remote = _remote(redis_server.url)
    remote.put(b"k", _block(5))
    raw = redis.Redis(port=redis_server.port)
    value = bytearray(raw.get(b"lmcached:k"))
    if damage == "flip":
        value[-7] ^= 0x10
    else:
        del value[-7:]
    raw.set(b"lmcached:k", bytes(value))
    assert remote.get(b"k") is None
    assert remote.stats()["checksum_failures"] == 1
    assert not raw.exists(b"lmcached:k")


def test_foreign_value_under_our_prefix_is_not_returned(redis_server) -> None:
    remote = _remote(redis_server.url)
    redis.Redis(port=redis_server.port).set(b"lmcached:k", b"some other program's value")
    assert remote.get(b"k") is None and remote.stats()["checksum_failures"] == 1


def test_dead_redis_fails_fast_then_recovers(redis_server) -> None:
    remote = _remote(redis_server.url, backoff_initial=0.05, backoff_max=0.2)
    assert remote.put(b"a", _block(1))
    redis_server.stop()
    assert remote.get(b"a") is None  # the call that discovers the outage
    assert remote.stats()["health"] == "down"
    assert not remote.put(b"b", _block(2))
    assert remote.get_many([b"a", b"b"]) == [None, None]
    stats = remote.stats()
    assert stats["unavailable"] + stats["skipped_while_down"] >= 3
    redis_server.start()
    wait_until(lambda: remote.put(b"c", _block(3)), 10, what="remote tier to recover")
    assert remote.stats()["health"] == "ok"
    assert remote.get(b"c").tobytes() == _block(3).tobytes()
    remote.close()


def test_hung_redis_is_bounded_by_the_timeout(redis_server) -> None:
    # SIGSTOP the server: connections are accepted by the kernel but never answered.
    remote = RemoteBackend(make_connector(redis_server.url, timeout=0.3), backoff_initial=0.05)
    assert remote.put(b"a", _block(1))
    redis_server.proc.send_signal(19)  # SIGSTOP
    try:
        start = time.monotonic()
        assert remote.get(b"a") is None
        elapsed = time.monotonic() - start
    finally:
        redis_server.proc.send_signal(18)  # SIGCONT
    # Not a performance assert: without a timeout this call would never return at all.
    assert elapsed < 30
    assert remote.stats()["health"] == "down"


def test_missing_shared_folder_is_unhealthy_not_fatal(tmp_path) -> None:
    remote = _remote(f"fs://{tmp_path}/nowhere")
    assert not remote.put(b"k", _block(1)) and remote.get(b"k") is None
    assert remote.stats()["health"] == "down"


def test_fs_purge_removes_stale_temp_files_only(tmp_path) -> None:
    import os

    (tmp_path / "shared" / "ab").mkdir(parents=True)
    stale = tmp_path / "shared" / "ab" / ".tmp-1-1-1"
    fresh = tmp_path / "shared" / "ab" / ".tmp-2-2-2"
    stale.write_bytes(b"torn")
    fresh.write_bytes(b"being written")
    os.utime(stale, (0, 0))
    remote = _remote(f"fs://{tmp_path}/shared")
    assert remote.remove_prefix(b"") == 0
    assert not stale.exists() and fresh.exists()


def test_remote_health_is_exported_as_a_metric(redis_server) -> None:
    from lmcached.daemon.metrics import flatten_worker_stats

    remote = _remote(redis_server.url, backoff_initial=5.0)
    redis_server.stop()
    remote.get(b"k")
    _, gauges = flatten_worker_stats({"store": {"remote": remote.stats()}})
    assert gauges[("tier:up", ("remote",))] == 0.0
    remote.close()
