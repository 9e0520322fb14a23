"""The CPU tier stays within its byte budget and evicts least recently used blocks first."""

from __future__ import annotations

from lmcached.routing import owner
from lmcached.storage.base import Block
from lmcached.storage.cpu import CPUBackend, entry_cost


def test_lru_evicts_oldest_and_respects_budget():
    # An entry costs its payload + key + meta + a fixed overhead (the budget counts them all).
    cost = entry_cost(b"k0", 100, None, arena=False)
    tier = CPUBackend(capacity_bytes=4 * cost)
    for i in range(4):
        assert tier.put(f"k{i}".encode(), Block.from_bytes(b"x" * 100))
    assert tier.get(b"k0") is not None  # k0 is now the most recent
    tier.put(b"k4", Block.from_bytes(b"y" * 100))
    assert not tier.contains(b"k1")
    assert tier.contains(b"k0") and tier.contains(b"k4")
    assert tier.usage().used_bytes <= 4 * cost
    assert tier.counters.evictions == 1
    assert not tier.put(b"huge", Block.from_bytes(b"z" * 4 * cost))
    assert tier.counters.rejected == 1
    tier.close()
    tier.close()


def test_daemon_evicts_under_a_small_budget(daemon_factory):
    d = daemon_factory(num_workers=2, max_local_cpu_size="4MiB")  # 2 MiB per worker
    block = b"b" * (256 * 1024)
    keys = [f"ev/{i}".encode() for i in range(64)]  # 16 MiB in all, 8x the budget
    with d.client() as c:
        for k in keys:
            c.put([k], [block])
        status = c.stats()
        for w in status["workers"]:
            cpu = w["stats"]["store"]["cpu"]
            assert cpu["used_bytes"] <= 2 * 1024 * 1024
            assert cpu["evictions"] > 0
        # The newest key of each worker survived; the oldest did not.
        for wid in (0, 1):
            mine = [k for k in keys if owner(k, 2) == wid]
            assert c.exists([mine[-1], mine[0]]) == [True, False]
