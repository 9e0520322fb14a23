"""Build a worker's TieredStore from the config: the one place that decides which tiers exist."""

from __future__ import annotations

from functools import partial

from lmcached.codecs.tier import apply_tier_codecs
from lmcached.config import Config
from lmcached.extensions.startup import build_external_backends, build_remote_connector
from lmcached.routing import owner
from lmcached.storage.base import StorageBackend
from lmcached.storage.cpu import CPUBackend
from lmcached.storage.tiered import TieredStore


def build_tiers(cfg: Config, worker_id: int) -> list[StorageBackend]:
    """Return the tiers of worker ``worker_id`` in lookup order: CPU, disk, remote, external."""
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
    key_owner = partial(owner, num_workers=cfg.num_workers)
    if cfg.local_disk:
        from lmcached.storage.disk import DiskBackend

        tiers.append(
            DiskBackend(
                cfg.local_disk,
                worker_id,
                cfg.disk_budget_per_worker,
                policy=cfg.eviction_policy,
                fsync=cfg.disk_fsync,
                drop_cache=cfg.disk_drop_cache,
                mmap_reads=cfg.disk_mmap_reads,
                owner=key_owner,
                num_workers=cfg.num_workers,
            )
        )
    if cfg.remote_url:
        # The registry picks the connector class by scheme, built-in or external alike; every
        # one sits behind the same verifying, fail-fast RemoteBackend.
        from lmcached.storage.remote import RemoteBackend

        connector = build_remote_connector(cfg, worker_id)
        if connector is not None:  # None: an external connector disabled at start
            tiers.append(
                RemoteBackend(
                    connector,
                    key_prefix=cfg.remote_key_prefix.encode(),
                    ttl=cfg.remote_ttl or None,
                    backoff_max=cfg.remote_backoff_max,
                    owner=key_owner,
                    worker_id=worker_id,
                )
            )
    # External backends (external_backends), in their listed order.
    tiers.extend(build_external_backends(cfg, worker_id))
    return apply_tier_codecs(cfg, tiers)  # disk_codec / remote_codec on the tiers named so


def build_store(cfg: Config, worker_id: int) -> TieredStore:
    return TieredStore(
        build_tiers(cfg, worker_id),
        write_policy=cfg.write_policy,
        queue_max_bytes=cfg.write_queue_size,
        shutdown_flush_timeout=cfg.shutdown_flush_timeout,
        max_frame_size=cfg.wire_frame_size,
    )


def check_store_config(cfg: Config) -> None:
    """Import and interface-check every extension the config uses; raise ConfigError if broken."""
    from lmcached.extensions.startup import check_config

    check_config(cfg)
