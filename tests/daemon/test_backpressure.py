"""Bounded work in a worker: a full I/O queue or too many bytes in flight get a 'busy' reply.

A stopped (SIGSTOP) Redis holds the worker's one remote read in its I/O pool, deterministically,
until the test lets it go; no timing is asserted.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmcached import LMCachedBusy, LMCachedUnavailable, protocol
from lmcached.testing import DaemonProcess, RedisServer, wait_until


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as r:
        yield r


def _gets_seen(c: Any) -> int:
    return sum(w["stats"]["ops"]["requests"].get("get", 0) for w in c.stats()["workers"])


def _keys(tag: str, n: int, length: int) -> list[bytes]:
    return [f"bp/{tag}/{i}/".encode().ljust(length, b"k") for i in range(n)]


@pytest.mark.parametrize(
    ("limits", "key_length"),
    [
        pytest.param({"io_queue_depth": 1}, 16, id="io_queue_depth"),
        # 100 keys of 400 bytes make a ~40 KB request: one fits in 64 KiB, two do not.
        pytest.param(
            {"max_inflight_bytes": "64KiB", "max_block_size": "64KiB"}, 400, id="inflight_bytes"
        ),
    ],
)
def test_worker_answers_busy_when_its_bound_is_reached(
    tmp_path: Path, redis: RedisServer, limits: dict[str, Any], key_length: int
) -> None:
    assert redis.proc is not None
    with (
        DaemonProcess(
            tmp_path / "d", num_workers=1, remote_url=redis.url, remote_timeout=30, **limits
        ) as d,
        d.client(timeout=60) as slow,
        d.client(timeout=30) as other,
    ):
        other.put([b"bp/cached"], [b"hot"])
        os.kill(redis.proc.pid, signal.SIGSTOP)  # the next remote read hangs until SIGCONT
        held: list[Any] = []
        try:
            reader = threading.Thread(
                target=lambda: held.append(slow.get(_keys("held", 100, key_length)))
            )
            reader.start()
            wait_until(lambda: _gets_seen(other) >= 1, 30, what="the held get to reach the pool")
            with pytest.raises(LMCachedBusy, match="busy") as err:
                other.get(_keys("refused", 100, key_length))
            assert isinstance(err.value, LMCachedUnavailable)  # transient: callers may retry
            # Work that needs no I/O slot is still served.
            assert bytes(other.get([b"bp/cached"])[0]) == b"hot"
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        reader.join(60)
        assert held == [[None] * 100]
        # The slot is free again: the same request is served.
        assert other.get(_keys("refused", 100, key_length)) == [None] * 100
        stats = other.stats()["workers"][0]["stats"]
        assert stats["ops"]["errors"].get(protocol.E_BUSY) == 1
