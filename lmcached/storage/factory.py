"""Build a worker's TieredStore from the config: the one place that decides which tiers exist."""

from __future__ import annotations

from lmcached.codecs.tier import apply_tier_codecs
from lmcached.config import Config
from lmcached.plugins.startup import plugin_tiers
from lmcached.storage.base import StorageBackend
from lmcached.storage.cpu import CPUBackend
from lmcached.storage.tiered import TieredStore


def build_tiers(cfg: Config, worker_id: int) -> list[StorageBackend]:
    """Return the tiers of worker ``worker_id`` in lookup order (CPU first)."""
    # With local_cpu off the CPU tier still exists with no budget, so every put is rejected
    # there and lower tiers (when configured) hold the data.
    if cfg.namespace_quotas:
        from lmcached.storage.namespaces import NamespacedBackend

        cpu: StorageBackend = NamespacedBackend(
            cfg.cpu_budget_per_worker, cfg.namespace_quotas_per_worker, cfg.eviction_policy
        )
    else:
        cpu = CPUBackend(cfg.cpu_budget_per_worker, cfg.eviction_policy)
    tiers: list[StorageBackend] = [cpu]
    # Extensions: a remote tier over an external connector, then external backends in order.
    tiers.extend(plugin_tiers(cfg, worker_id))
    return apply_tier_codecs(cfg, tiers)  # disk_codec / remote_codec on the tiers named so


def build_store(cfg: Config, worker_id: int) -> TieredStore:
    return TieredStore(build_tiers(cfg, worker_id))


def needs_checksums(cfg: Config) -> bool:
    """Return True when blocks leave process memory, so clients must send payload checksums."""
    return False
