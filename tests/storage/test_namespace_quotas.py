"""Namespace quotas: tenant A's puts cannot evict tenant B's blocks within B's quota."""

from __future__ import annotations

import pytest

from lmcached import config
from lmcached.errors import ConfigError
from lmcached.storage.base import Block
from lmcached.storage.cpu import entry_cost
from lmcached.storage.namespaces import NamespacedBackend, namespace_of

KIB = 1024


def block(n: int = KIB) -> Block:
    return Block.from_bytes(b"\x01" * n)


def test_namespace_is_the_prefix_before_the_first_slash():
    assert namespace_of(b"tenant-a/llama@0/any/00ff") == "tenant-a"
    assert namespace_of(b"no-slash-key") == ""


def test_a_flood_from_one_tenant_evicts_only_its_own_blocks():
    cost = entry_cost(b"b/m@0/any/0000", KIB, None, arena=False)  # keys of the same length
    tier = NamespacedBackend(16 * cost, {"a": 4 * cost, "b": 4 * cost})
    b_keys = [b"b/m@0/any/%04d" % i for i in range(4)]
    for k in b_keys:
        assert tier.put(k, block())
    for i in range(100):
        assert tier.put(b"a/m@0/any/%04d" % i, block())
    for i in range(100):
        assert tier.put(b"shared-%04d" % i, block())  # keys outside any quota share the rest
    assert all(tier.contains(k) for k in b_keys)
    assert tier.get(b_keys[0]) is not None
    ns = tier.namespace_stats()
    assert ns["a"]["used_bytes"] == 4 * cost
    assert ns["a"]["evictions"] == 96
    assert ns["b"] == {
        "used_bytes": 4 * cost,
        "quota_bytes": 4 * cost,
        "entries": 4,
        "evictions": 0,
        "rejected": 0,
    }
    assert tier.usage().used_bytes <= 16 * cost
    tier.close()
    tier.close()


def test_a_tenant_over_its_own_quota_evicts_its_oldest_blocks():
    cost = entry_cost(b"b/1", KIB, None, arena=False)
    tier = NamespacedBackend(8 * cost, {"b": 2 * cost})
    tier.put(b"b/1", block())
    tier.put(b"b/2", block())
    tier.put(b"b/3", block())
    assert not tier.contains(b"b/1")
    assert tier.contains(b"b/3")
    assert not tier.put(b"b/huge", block(2 * cost))  # alone larger than the quota
    assert tier.namespace_stats()["b"]["rejected"] == 1
    stats = tier.stats()
    assert stats["evictions"] == 1
    assert stats["capacity_bytes"] == 8 * cost


def test_quotas_are_split_across_workers_and_must_fit_the_budget():
    cfg = config.from_mapping(
        {"num_workers": 4, "max_local_cpu_size": "8GiB", "namespace_quotas": {"a": "2GiB"}},
        environ={},
    )
    assert cfg.namespace_quotas_per_worker == {"a": (2 << 30) // 4}
    with pytest.raises(ConfigError, match="add up to"):
        config.from_mapping(
            {"max_local_cpu_size": 1, "namespace_quotas": {"a": 1, "b": "1MiB"}}, environ={}
        )
    with pytest.raises(ConfigError, match="without '/'"):
        config.from_mapping({"namespace_quotas": {"a/b": 1}}, environ={})


def test_quotas_round_trip_through_the_workers_config_file():
    cfg = config.from_mapping({"namespace_quotas": {"a": "512KiB", "b": 0.25}}, environ={})
    again = config.from_mapping(cfg.to_dict(redact=False), environ={})
    assert again.namespace_quotas == cfg.namespace_quotas == {"a": 512 << 10, "b": 1 << 28}
