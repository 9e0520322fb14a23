"""Eviction policies as registry entries; S3-FIFO beats LRU on a workload with one-time scans."""

from __future__ import annotations

import pytest

from lmcached.storage.base import Block
from lmcached.storage.cpu import CPUBackend, entry_cost
from lmcached.storage.eviction import POLICIES, LRUPolicy, S3FIFOPolicy, make_policy
from lmcached.storage.eviction_trace import compare, replay, scan_workload


def test_policy_table_is_served_by_the_registry(registry, example_installed):
    from lmcached.extensions import sources

    assert sorted(POLICIES) == ["lru", "s3fifo"]
    assert POLICIES["s3fifo"] is S3FIFOPolicy
    sources.load()
    assert "fifo" in POLICIES  # a package's manifest row adds a policy
    assert type(make_policy("fifo")).__name__ == "FIFOPolicy"
    with pytest.raises(ValueError, match="known: fifo, lru, s3fifo"):
        make_policy("arc")


def test_registry_can_replace_a_builtin_policy(registry):
    class Counting(LRUPolicy):
        pass

    Counting.__qualname__ = "LRUPolicy"  # registered by path: make it importable
    registry.register(
        "eviction_policy", "lru", "lmcached.storage.eviction:S3FIFOPolicy", priority=1
    )
    assert isinstance(make_policy("lru"), S3FIFOPolicy)


def test_s3fifo_beats_lru_on_one_time_scans():
    lru, s3fifo = compare(("lru", "s3fifo"))
    # 8800 accesses: 7000 to a hot set of 100 keys, 1800 to keys scanned once. The cache
    # holds 150 blocks. LRU loses the hot set to each of the 6 scans (100 misses each, plus
    # the 100 cold misses); S3-FIFO keeps it, so its only hot misses are the cold ones.
    assert lru.accesses == s3fifo.accesses == 8800
    assert lru.hits == 7000 - 100 - 6 * 100
    assert s3fifo.hits == 7000 - 100
    assert s3fifo.hits > lru.hits


def test_without_scans_s3fifo_is_no_worse_than_lru():
    trace = scan_workload(scan_length=0)
    assert replay("s3fifo", trace, 150).hits >= replay("lru", trace, 150).hits


def test_s3fifo_ghost_hit_goes_straight_to_main():
    p = S3FIFOPolicy()
    for k in (b"a", b"b", b"c"):
        p.on_insert(k, 10)
    victim = p.victim()
    assert victim == b"a"  # oldest in the small queue, never hit
    p.on_remove(victim)
    p.on_insert(b"a", 10)  # back soon: remembered by the ghost list
    assert b"a" in p._main
    # A delete is not an eviction: it leaves no ghost.
    p.on_remove(b"b")
    p.on_insert(b"b", 10)
    assert b"b" in p._small


def test_s3fifo_in_a_tier_respects_the_budget_and_close_is_idempotent():
    budget = 10 * entry_cost(b"k00", 100, None, arena=False)  # about ten entries
    tier = CPUBackend(budget, "s3fifo")
    for i in range(50):
        tier.put(b"k%d" % i, Block.from_bytes(bytes(100)))
        if i % 3 == 0:
            tier.get(b"k0")
    assert tier.usage().used_bytes <= budget
    assert tier.contains(b"k0")  # the frequently hit key survived
    assert len(tier.policy) == tier.usage().entries
    tier.close()
    tier.close()
    assert S3FIFOPolicy().victim() is None
