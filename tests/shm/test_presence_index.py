"""A same-host lookup counts a prompt's prefix hit in the owner's presence index, with no round
trip; it answers as the worker would, and never for a worker that is gone."""

from __future__ import annotations

import os
import signal

from lmcached.client import Client
from lmcached.keys import KeyBuilder
from lmcached.routing import owner
from lmcached.testing import wait_until

from .helpers import worker_pid

KIB = 1 << 10


def _prompt(name: str, chunks: int) -> list[bytes]:
    kb = KeyBuilder(namespace="test", model=name, chunk_size=4)
    return kb.chunk_keys(list(range(chunks * 4)))


def _lookups_served(client: Client) -> int:
    """Lookup and exists requests the workers have served."""
    return sum(
        w["stats"]["ops"]["requests"].get(op, 0)
        for w in client.stats()["workers"]
        for op in ("lookup", "exists")
    )


def test_a_same_host_lookup_is_answered_from_the_presence_index_without_a_round_trip(
    daemon_factory,
):
    d = daemon_factory(num_workers=2)
    keys = _prompt("index", 128)
    with d.client(timeout=30) as c, d.client(timeout=30, shared_memory=False) as zmq_only:
        c.put(keys[:100], [b"x"] * 100)
        served = _lookups_served(c)
        assert c.lookup(keys) == 100
        c.delete([keys[40]])
        assert c.lookup(keys) == 40
        assert c.lookup(keys[41:100]) == 59
        assert c.exists(keys[39:42] + keys[99:101]) == [True, False, True, True, False]
        assert _lookups_served(c) == served  # no lookup reached a worker
        # The worker's own answer over ZMQ agrees.
        assert zmq_only.lookup(keys) == 40
        assert _lookups_served(c) == served + 1


def test_keys_spread_over_workers_are_counted_as_the_workers_count_them(daemon_factory):
    d = daemon_factory(num_workers=2)
    keys = [b"plain/%d" % i for i in range(40)]  # no route: each key has its own owner
    assert len({owner(k, 2) for k in keys}) == 2
    with d.client(timeout=30) as c, d.client(timeout=30, shared_memory=False) as zmq_only:
        c.put(keys[:30], [b"x"] * 30)
        c.delete([keys[17]])
        assert c.lookup(keys) == zmq_only.lookup(keys) == 17
        assert c.exists(keys) == zmq_only.exists(keys)
        assert c.lookup(keys[18:]) == zmq_only.lookup(keys[18:]) == 12


def test_evicted_blocks_leave_the_presence_index_with_the_tier(daemon_factory):
    d = daemon_factory(num_workers=1, max_local_cpu_size="4MiB")
    prompts = [_prompt(f"evict{p}", 16) for p in range(12)]
    value = b"v" * (64 * KIB)
    with d.client(timeout=30) as c, d.client(timeout=30, shared_memory=False) as zmq_only:
        for keys in prompts:  # 12 MiB through a 4 MiB tier: most of it is evicted
            c.put(keys, [value] * len(keys))
        local = [c.lookup(keys) for keys in prompts]
        assert local == [zmq_only.lookup(keys) for keys in prompts]
        assert local[-1] == 16 and local[0] == 0
        for keys, hit in zip(prompts, local, strict=True):
            got = c.get(keys[:hit])
            assert all(v is not None for v in got)  # every block the index claimed is there


def test_a_miss_in_the_index_asks_the_worker_when_a_lower_tier_may_hold_the_key(
    daemon_factory, tmp_path
):
    d = daemon_factory(
        num_workers=1,
        max_local_cpu_size="2MiB",
        local_disk=str(tmp_path / "disk"),
        max_local_disk_size="64MiB",
    )
    keys = _prompt("lower", 64)
    with d.client(timeout=30) as c:
        c.put(keys, [b"d" * (64 * KIB)] * len(keys))
        c.flush()
        served = _lookups_served(c)
        # Only the newest blocks fit in CPU memory; the disk holds the rest of the chain.
        assert c.lookup(keys) == 64
        assert c.exists([*keys[:2], b"absent"]) == [True, True, False]
        assert _lookups_served(c) == served + 2


def test_the_index_of_a_killed_worker_stops_answering_lookups(daemon_factory):
    d = daemon_factory(num_workers=1)
    keys = _prompt("killed", 32)
    with d.client(timeout=30) as writer, d.client(timeout=30) as looker:
        writer.put(keys, [b"k"] * len(keys))
        assert looker.lookup(keys) == 32
        old_pid = worker_pid(writer, 0)
        os.kill(old_pid, signal.SIGKILL)

        def restarted() -> bool:
            w = writer.control("map")["map"]["workers"][0]
            return w["state"] == "up" and w["pid"] != old_pid

        wait_until(restarted, 60, what="worker restart")
        # The looker still maps the dead worker's arena; its index must not claim the blocks
        # the CPU tier lost with the worker.
        assert looker.lookup(keys) == 0
        writer.put(keys[:5], [b"k"] * 5)
        served = _lookups_served(writer)
        # A client that only looks up has moved to the new worker's arena: no round trips.
        assert [looker.lookup(keys) for _ in range(3)] == [5, 5, 5]
        assert _lookups_served(writer) == served
