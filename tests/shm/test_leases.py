"""Leases: a zero-copy view keeps its slot from reuse; past its lease a reader gets an error."""

from __future__ import annotations

import os

import pytest

from lmcached.client.shared import check_view
from lmcached.errors import LMCachedLeaseExpired
from lmcached.testing import wait_until

from .helpers import cpu_stats

MIB = 1 << 20


def _flood(c, prefix: str, n: int, size: int) -> None:
    for i in range(n):
        c.put([f"{prefix}/{i}".encode()], [os.urandom(size)])


def test_eviction_under_a_reader_keeps_the_readers_bytes(daemon_factory):
    # One worker, 8 MiB: the flood below evicts the block while a view of it is held.
    d = daemon_factory(num_workers=1, max_local_cpu_size="8MiB", lease_timeout=60)
    value = os.urandom(MIB)
    with d.client(timeout=30) as c:
        c.put([b"held"], [value])
        view = c.get([b"held"])[0]
        _flood(c, "flood", 40, MIB)
        assert c.get([b"held"]) == [None]  # evicted from the index ...
        stats = cpu_stats(c)[0]
        assert stats["evictions"] > 0 and stats["arena_zombies"] == 1  # ... its slot kept
        assert bytes(view) == value  # the reader still sees its own bytes
        check_view(view)
        view.release()
        # The release travels with the next get; the zombie slot is then reused.
        c.get([b"flood/0"])
        wait_until(lambda: cpu_stats(c)[0]["arena_zombies"] == 0, 20, what="slot reclaimed")


def test_a_reader_past_its_lease_gets_an_error_not_other_bytes(daemon_factory):
    d = daemon_factory(num_workers=1, max_local_cpu_size="8MiB", lease_timeout=0.5)
    value = os.urandom(MIB)
    with d.client(timeout=30) as c:
        c.put([b"late"], [value])
        view = c.get([b"late"])[0]
        # The lease expires; the worker then frees the slot and reuses it for the flood.
        wait_until(lambda: cpu_stats(c)[0]["arena_pinned"] == 0, 20, what="lease expiry")
        _flood(c, "flood", 40, MIB)
        with pytest.raises(LMCachedLeaseExpired, match="evicted or its lease expired"):
            check_view(view)


def test_get_into_never_needs_a_lease_and_survives_eviction_races(daemon_factory):
    d = daemon_factory(num_workers=1, max_local_cpu_size="8MiB")
    with d.client(timeout=30) as c:
        for round_ in range(20):
            vals = [os.urandom(512 * 1024) for _ in range(4)]
            keys = [f"r{round_}/{i}".encode() for i in range(4)]
            c.put(keys, vals)
            bufs = [bytearray(512 * 1024) for _ in keys]
            found = c.get_into(keys, bufs)
            for ok, buf, val in zip(found, bufs, vals, strict=True):
                assert not ok or buf == val  # never someone else's bytes
        assert cpu_stats(c)[0]["arena_pinned"] <= 1


def test_views_released_by_garbage_collection_end_their_lease(daemon_factory):
    d = daemon_factory(num_workers=1, lease_timeout=60)
    with d.client(timeout=30) as c:
        c.put([b"a", b"b"], [b"1" * 100_000, b"2" * 100_000])
        views = c.get([b"a", b"b"])
        assert cpu_stats(c)[0]["arena_pinned"] == 1  # one lease for the reply
        del views
        c.get([b"missing"])  # carries the release
        assert cpu_stats(c)[0]["arena_pinned"] == 0


def test_a_closing_client_gives_back_the_leases_of_its_dropped_views(daemon_factory):
    """Releases rode only on a client's next get: a client that closed (a finished process)
    left its last slots pinned for lease_timeout, zombies that can keep a large block from
    finding room in the arena."""
    d = daemon_factory(num_workers=1, max_local_cpu_size="8MiB", lease_timeout=600)
    value = os.urandom(MIB)
    with d.client(timeout=30) as reader:
        reader.put([b"held"], [value])
        view = reader.get([b"held"])[0]
        assert bytes(view) == value
        view.release()  # dropped: its lease waits for this client's next get
    with d.client(timeout=30) as other:
        _flood(other, "flood", 40, MIB)  # evicts "held"
        stats = cpu_stats(other)[0]
        assert stats["evictions"] > 0 and stats["arena_zombies"] == 0
        assert stats["arena_pinned"] == 0
