"""Assemble a worker's store from the config: the one place that decides which tiers exist.

Assembly runs in two steps that share one parsed structure, a :class:`StorePlan`:

1. :func:`plan_store` reads the config's LMCache-style plugin declarations (``external_backends``
   and ``extra_config`` ``external_backend.*`` / ``external_connector.*``) once, registers them,
   names each tier's codec, and asks the extension registry about every name the config uses:
   the eviction policy, the tier codecs, the external backends, the connector of
   ``remote_url``'s scheme and every declared connector. Each is imported and checked against
   its category's interface, and plugin options are type-checked. Anything wrong raises
   :class:`~lmcached.errors.ConfigError` with one line naming the key.
2. :func:`build_store` builds, from that plan, the tiers in lookup order (CPU, with namespace
   quotas when set; disk; remote, behind its connector; the external backends in listed order),
   wraps the disk and remote tiers in their codecs, guards every external plugin, and starts
   the plugins (``on_startup``; a failure disables the plugin unless ``strict_plugins``).

:func:`check_store_config` is step 1 plus the script-plugin folder check: what ``lmcached config
check`` runs. A worker runs step 1 inside :func:`build_store`, so a config naming something
that does not exist stops the worker with that line (the scheduler then stops the daemon);
the scheduler itself never imports this module, the store or the registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import structlog

from lmcached import config_lmcache
from lmcached.codecs.base import CodecError, make_codec
from lmcached.codecs.tier import CodecTier
from lmcached.config import Config
from lmcached.errors import ConfigError
from lmcached.extensions import sources
from lmcached.extensions.guard import GuardedBackend, GuardedConnector
from lmcached.extensions.interfaces import RemoteConnector
from lmcached.extensions.lifecycle import (
    PluginBase,
    PluginConfigError,
    PluginContext,
    typed_config,
)
from lmcached.extensions.registry import (
    PluginError,
    PluginNotFoundError,
    PluginRegistry,
    get_registry,
)
from lmcached.extensions.startup import start_plugin
from lmcached.routing import owner
from lmcached.storage.arena import ENTRY_OVERHEAD, Arena, arena_dir, instance_tag
from lmcached.storage.base import StorageBackend
from lmcached.storage.cpu import CPUBackend
from lmcached.storage.disk import DiskBackend
from lmcached.storage.integrity import IntegrityKeyError, load_integrity_key
from lmcached.storage.namespaces import NamespacedBackend
from lmcached.storage.remote import RemoteBackend
from lmcached.storage.tiered import TieredStore
from lmcached.supervision.discovery import check_plugin_locations

log = structlog.get_logger("lmcached.plugins")

# LMCache's remote_serde values. naive stores bytes as they are; kivi and cachegen are lossy
# tensor encodings that need the dtype and shape, which only the client has.
SERDE_REFUSED = {
    "kivi": (
        "remote_serde 'kivi' is lossy KV quantisation, which lmcached does on the client: "
        "quantise with lmcached.codecs.int8.quantize_tensor (the 'int8' codec, per-channel "
        "scales) before put, and set remote_serde: naive (or remote_codec: zstd)"
    ),
    "cachegen": (
        "remote_serde 'cachegen' (CacheGen's learned KV encoding) has no lmcached codec; use "
        "remote_codec: zstd or lz4 for lossless compression, or the client-side 'int8' codec"
    ),
}
SERDE_NONE = {"naive", "none", "torch", "safetensor"}
CODEC_TIERS = ("disk", "remote")


@dataclass(frozen=True)
class StorePlan:
    """What a config asks the store to be, checked against the registry; built by plan_store."""

    cfg: Config
    registry: PluginRegistry
    plugins: sources.ConfigPlugins
    codecs: Mapping[str, str] = field(default_factory=dict)  # tier name -> codec name


# ------------------------------------------------------------------------------------------
# Checking
# ------------------------------------------------------------------------------------------


def check_store_config(cfg: Config) -> None:
    """Check every name the config uses against the registry, and the plugin folders.

    Raises ConfigError with a one-line reason naming the key. Imports each extension the
    config uses (see :func:`plan_store`); builds and starts nothing.
    """
    plan_store(cfg)
    check_plugin_locations(cfg)
    integrity_key(cfg)


def integrity_key(cfg: Config) -> bytes | None:
    """Return the MAC key of the shared tiers (None: not configured); ConfigError if unusable."""
    if not cfg.integrity_key_file:
        return None
    try:
        return load_integrity_key(cfg.integrity_key_file)
    except IntegrityKeyError as exc:
        raise ConfigError("integrity_key_file", str(exc), cfg.source) from None


def remote_value_cap(cfg: Config) -> int:
    """Return the largest remote value a worker reads: the largest block a client may put, as a
    codec may have grown it, behind the largest header it may have."""
    header = 4096 + len(cfg.remote_key_prefix.encode()) + cfg.max_key_length + cfg.max_meta_bytes
    return cfg.max_block_size + cfg.max_block_size // 100 + header + (256 << 10)


def plan_store(cfg: Config, registry: PluginRegistry | None = None) -> StorePlan:
    """Parse the config's plugin declarations once, register them, and check every used entry."""
    registry = registry or get_registry()
    report = sources.load(registry)
    for name, error in report.failed.items():
        log.warning("plugin package failed to load", plugin=name, error=error)
    plugins = sources.parse_config_plugins(cfg)
    sources.register_config_plugins(plugins, registry)
    for note in plugins.notes:
        log.warning("deprecated config spelling", note=note, source=cfg.source)
    src = cfg.source
    try:
        # A name, or any importable class path (``my_pkg.policies:MyLRU``).
        registry.get_class("eviction_policy", cfg.eviction_policy)
    except PluginNotFoundError:
        raise ConfigError(
            "eviction_policy",
            f"unknown policy {cfg.eviction_policy!r}; "
            f"known: {', '.join(registry.names('eviction_policy'))}",
            src,
        ) from None
    except PluginError as exc:
        raise ConfigError("eviction_policy", str(exc), src) from None
    codecs: dict[str, str] = {}
    for tier in CODEC_TIERS:
        codec = tier_codec(cfg, tier)
        if codec is not None:
            key = f"{tier}_codec" if getattr(cfg, f"{tier}_codec") else "remote_serde"
            _require_codec(registry, codec, key, src)
            codecs[tier] = codec
    for spec in plugins.backends:
        cls = _require(
            registry, "storage_backend", spec.name, f"external_backends ({spec.name})", src
        )
        _check_options(cls, spec, src)
    if cfg.remote_url:
        # Built-in and external schemes alike: the registry's winner for the scheme serves it.
        _require_connector(registry, cfg.remote_url, src)
    for scheme, spec in plugins.connectors.items():
        # Declared but unused connectors are still imported: a typo must not hide until the
        # day remote_url changes.
        cls = _require(registry, "remote_connector", scheme, f"extra_config.{spec.key_prefix}", src)
        _check_options(cls, spec, src)
    return StorePlan(cfg, registry, plugins, codecs)


def tier_codec(cfg: Config, tier: str) -> str | None:
    """Return the codec name of ``tier`` ('disk' or 'remote'), or None for no codec.

    ``remote_codec`` wins over LMCache's ``remote_serde``; setting both to different codecs is
    refused. ``remote_serde: naive`` means no codec; ``kivi`` and ``cachegen`` are refused with
    the lmcached equivalent.
    """
    if tier == "disk":
        return _codec_name(cfg.disk_codec)
    if tier != "remote":
        raise ValueError(f"tiers with codecs are {' and '.join(CODEC_TIERS)}, not {tier!r}")
    serde = (cfg.remote_serde or "").lower() or None
    if serde in SERDE_REFUSED:
        raise ConfigError("remote_serde", SERDE_REFUSED[serde], cfg.source)
    from_serde = None if serde is None or serde in SERDE_NONE else serde
    codec = _codec_name(cfg.remote_codec)
    if codec is not None and from_serde is not None and codec != from_serde:
        raise ConfigError(
            "remote_serde",
            f"says {serde!r} but remote_codec says {cfg.remote_codec!r}; keep one",
            cfg.source,
        )
    return codec or from_serde


def _codec_name(name: str | None) -> str | None:
    if name is None or name.lower() == "none":
        return None
    return name.lower()


def _require(
    registry: PluginRegistry, category: str, name: str, key: str, src: str | None
) -> type[Any]:
    try:
        return registry.get_class(category, name)
    except PluginError as exc:
        raise ConfigError(key, str(exc), src) from None


def _require_connector(registry: PluginRegistry, url: str, src: str | None) -> type[Any]:
    scheme = urlsplit(url).scheme.lower()
    if not registry.has("remote_connector", scheme):
        lmcache_only = config_lmcache.unsupported_scheme_message(scheme)
        if lmcache_only:
            raise ConfigError("remote_url", lmcache_only, src)
        raise ConfigError(
            "remote_url",
            f"no connector for scheme {scheme!r}; registered: "
            f"{', '.join(registry.names('remote_connector'))} (or set extra_config "
            f"external_connector.{scheme}.module_path/class_name)",
            src,
        )
    return _require(registry, "remote_connector", scheme, "remote_url", src)


def _require_codec(registry: PluginRegistry, name: str, key: str, src: str | None) -> None:
    try:
        codec = make_codec(name)
    except (PluginError, CodecError) as exc:
        raise ConfigError(key, str(exc), src) from None
    entry = registry.get_entry("codec", name)
    if not codec.lossless or entry.metadata.get("side") == "client":
        raise ConfigError(
            key,
            f"codec {name!r} is lossy and runs in the client's tensor helpers "
            "(it needs each tensor's dtype and shape); tiers take lossless codecs: "
            + ", ".join(
                e.name for e in registry.iter_entries("codec") if e.metadata.get("lossless")
            ),
            src,
        )


def _check_options(cls: type, spec: sources.ExternalSpec, src: str | None) -> None:
    if not issubclass(cls, PluginBase):
        if spec.kind == "external_connector" and spec.options:
            # Such a connector is built as cls(url, timeout=...): its options would be lost.
            option = sorted(spec.options)[0]
            raise ConfigError(
                f"extra_config.{spec.key_prefix}.{option}",
                f"{spec.class_path} takes no options: it does not derive from "
                "lmcached.extensions.lifecycle.PluginBase",
                src,
            )
        return
    try:
        typed_config(cls.config_class, spec.options, spec.key_prefix)
    except PluginConfigError as exc:
        raise ConfigError(f"extra_config.{spec.key_prefix}.{exc.field}", exc.message, src) from None


# ------------------------------------------------------------------------------------------
# Building (in each worker)
# ------------------------------------------------------------------------------------------


def build_store(cfg: Config, worker_id: int) -> TieredStore:
    """Check the config (as check_store_config does, less the folders) and build the store."""
    return TieredStore(
        build_tiers(cfg, worker_id),
        write_policy=cfg.write_policy,
        queue_max_bytes=cfg.write_queue_size,
        shutdown_flush_timeout=cfg.shutdown_flush_timeout,
        max_frame_size=cfg.wire_frame_size,
    )


def make_arena(cfg: Config, worker_id: int) -> Arena | None:
    """Create the worker's shared-memory arena, sized by its CPU budget (None when off)."""
    budget = cfg.cpu_budget_per_worker
    if not cfg.shared_memory or budget <= 0:
        return None
    # Every entry costs at least ENTRY_OVERHEAD, so the budget bounds the descriptors too. The
    # payload area has an eighth more than the budget for the buddy allocator's fragmentation;
    # the budget, not the file size, bounds what is written (tmpfs pages come on first write).
    try:
        return Arena(
            arena_dir(),
            instance_tag(cfg.instance_dir),
            worker_id,
            data_size=budget + budget // 8,
            descriptors=budget // ENTRY_OVERHEAD + 1,
            group=cfg.socket_group,
            lease_timeout=cfg.lease_timeout,
        )
    except OSError as exc:
        # No usable shared memory (a full or read-only /dev/shm): serve over ZMQ, say so once.
        log.warning("shared_memory_unavailable", worker=worker_id, error=str(exc))
        return None


def build_tiers(cfg: Config, worker_id: int) -> list[StorageBackend]:
    """Return the tiers of worker ``worker_id`` in lookup order: CPU, disk, remote, external."""
    plan = plan_store(cfg)
    # With local_cpu off the CPU tier still exists with no budget, so every put is rejected
    # there and lower tiers (when configured) hold the data.
    arena = make_arena(cfg, worker_id)
    tiers: list[StorageBackend] = []
    try:
        if cfg.namespace_quotas:
            cpu: StorageBackend = NamespacedBackend(
                cfg.cpu_budget_per_worker,
                cfg.namespace_quotas_per_worker,
                cfg.eviction_policy,
                make_partition=partial(CPUBackend, arena=arena),
            )
        else:
            cpu = CPUBackend(cfg.cpu_budget_per_worker, cfg.eviction_policy, arena=arena)
        tiers.append(cpu)
        key_owner = partial(owner, num_workers=cfg.num_workers)
        if cfg.local_disk:
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
            # Every connector, built-in or external, sits behind the same verifying, fail-fast
            # RemoteBackend.
            connector = build_remote_connector(plan, worker_id)
            if connector is not None:  # None: an external connector disabled at start
                tiers.append(
                    RemoteBackend(
                        connector,
                        key_prefix=cfg.remote_key_prefix.encode(),
                        ttl=cfg.remote_ttl or None,
                        backoff_max=cfg.remote_backoff_max,
                        owner=key_owner,
                        worker_id=worker_id,
                        integrity_secret=integrity_key(cfg),
                        max_value_bytes=remote_value_cap(cfg),
                    )
                )
        tiers.extend(build_external_backends(plan, worker_id))
        return apply_tier_codecs(plan, tiers)
    except BaseException:
        # A worker that cannot build its store exits at once. Its arena file must not
        # outlive it: only the instance's next successful start would remove it.
        for tier in reversed(tiers):
            with contextlib.suppress(Exception):
                tier.close()
        if arena is not None:
            arena.close()
        raise


def apply_tier_codecs(plan: StorePlan, tiers: list[StorageBackend]) -> list[StorageBackend]:
    """Wrap the tiers named ``disk`` and ``remote`` in their planned codecs, if any."""
    out: list[StorageBackend] = []
    for tier in tiers:
        codec = plan.codecs.get(tier.name)
        if codec is not None and not isinstance(tier, CodecTier):
            tier = CodecTier(tier, codec)
        out.append(tier)
    return out


def build_external_backends(plan: StorePlan, worker_id: int = 0) -> list[StorageBackend]:
    """Build the plan's external backends in listed order, each guarded; skip failed ones."""
    cfg, registry = plan.cfg, plan.registry
    out: list[StorageBackend] = []
    for spec in plan.plugins.backends:
        cls = registry.get_class("storage_backend", spec.name)
        ctx = _context(cfg, spec.name, "storage_backend", worker_id)
        options = dict(spec.options)
        instance = start_plugin(
            cls,
            partial(cls, options, ctx),
            spec.name,
            "storage_backend",
            strict=cfg.strict_plugins,
        )
        if instance is not None:
            entry = registry.get_entry("storage_backend", spec.name)
            out.append(GuardedBackend(spec.name, instance, entry.class_path))
    return out


def build_remote_connector(
    plan: StorePlan, worker_id: int = 0, *, remote_url: str | None = None
) -> RemoteConnector | None:
    """Build the connector for ``remote_url``'s scheme, as the registry resolves it.

    A class deriving from :class:`~lmcached.extensions.lifecycle.PluginBase` is built as
    ``cls(url, timeout=..., options=..., context=...)`` and started (``on_startup``); any other
    as ``cls(url, timeout=...)``. A connector from outside lmcached (the winning entry is not a
    built-in) is wrapped in :class:`~lmcached.extensions.guard.GuardedConnector`, so whatever
    it raises marks the remote down instead of failing requests.

    Returns None when there is no ``remote_url``, or when the connector failed in
    ``on_startup`` and ``strict_plugins`` is false (the daemon then runs without its remote
    tier). ``remote_url`` overrides the config's. An unregistered scheme raises ConfigError.
    """
    cfg, registry = plan.cfg, plan.registry
    remote_url = remote_url or cfg.remote_url
    if not remote_url:
        return None
    timeout = float(cfg.remote_timeout or cfg.request_timeout)
    cls = _require_connector(registry, remote_url, cfg.source)
    # Connector constructors take the URL first, which PluginBase's own signature (what
    # issubclass narrows ``cls`` to) does not declare: construct through an untyped callable.
    construct: Callable[..., Any] = cls
    scheme = urlsplit(remote_url).scheme.lower()
    entry = registry.get_entry("remote_connector", scheme)
    if entry.builtin and not issubclass(cls, PluginBase):
        connector: RemoteConnector = construct(remote_url, timeout=timeout)
        return connector
    spec = plan.plugins.connectors.get(scheme)
    build: Callable[[], Any]
    if issubclass(cls, PluginBase):
        ctx = _context(cfg, scheme, "remote_connector", worker_id)
        options: Mapping[str, Any] = dict(spec.options) if spec is not None else {}
        build = partial(construct, remote_url, timeout=timeout, options=options, context=ctx)
    else:
        build = partial(construct, remote_url, timeout=timeout)
    instance = start_plugin(cls, build, scheme, "remote_connector", strict=cfg.strict_plugins)
    if instance is None:
        return None
    return GuardedConnector(scheme, instance, entry.class_path)


def _context(cfg: Config, name: str, category: str, worker_id: int) -> PluginContext:
    return PluginContext(
        name=name,
        category=category,
        worker_id=worker_id,
        num_workers=cfg.num_workers,
        config_source=cfg.source,
    )
