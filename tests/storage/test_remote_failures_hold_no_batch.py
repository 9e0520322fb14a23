"""A failed Redis call frees its batch at once: no reference cycle keeps it for the cyclic GC.

A failed redis-py pipeline raises the first error of its replies list, held by the pipeline's
frame: the error's traceback holds that frame, so the batch (blocks, joined values, packed
commands) stayed alive in a cycle until a full collection. A full Redis (maxmemory with
noeviction) failed every write batch that way, and a worker's heap grew by tens of MiB.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lmcached.storage.base import Block
from lmcached.storage.remote import RemoteBackend, make_connector
from lmcached.testing import RedisServer

BLOCK = 64 * 1024


def _batch(tag: str, n: int = 32) -> list[tuple[bytes, Block]]:
    return [(f"{tag}/{i:04d}".encode(), Block.from_bytes(bytes([i]) * BLOCK)) for i in range(n)]


@contextmanager
def _no_cycles_left() -> Iterator[None]:
    """Fail if the body leaves objects that only the cyclic GC can free."""
    gc.collect()
    gc.disable()
    try:
        yield
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0, f"{found} objects were left in reference cycles"


@pytest.fixture
def full_redis(tmp_path) -> Iterator[RedisServer]:
    with RedisServer(
        tmp_path / "redis", extra_args=["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]
    ) as server:
        yield server


def test_rejected_write_batch_of_a_full_redis_leaves_no_cycle(full_redis) -> None:
    remote = RemoteBackend(make_connector(full_redis.url, timeout=2.0))
    try:
        while all(remote.put_many(_batch(f"fill{remote.counters.puts}", 8))):
            pass  # until Redis answers OOM
        rejected = remote.counters.extra["rejected_blocks"] + remote.counters.rejected
        with _no_cycles_left():
            assert remote.put_many(_batch("over")) == [False] * 32
        assert remote.counters.rejected > rejected
    finally:
        remote.close()


def test_calls_to_a_dead_redis_leave_no_cycle(tmp_path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    remote = RemoteBackend(make_connector(server.url, timeout=2.0), backoff_initial=0.0)
    try:
        assert all(remote.put_many(_batch("alive", 4)))
        server.stop()
        with _no_cycles_left():
            assert remote.put_many(_batch("dead")) == [False] * 32
            assert remote.get_many([k for k, _ in _batch("alive", 4)]) == [None] * 4
        assert remote.stats()["health"] == "down"
    finally:
        remote.close()
        server.stop()
