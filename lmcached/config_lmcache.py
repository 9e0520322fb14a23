"""What lmcached does with each key of LMCache 0.5's config schema, so LMCache files run as is.

Every key and alias of LMCache's ``_CONFIG_DEFINITIONS`` / ``_CONFIG_ALIASES`` (checked against
``tests/fixtures/lmcache_0_5_6_config_keys.json``, written by ``scripts/lmcache_schema.py``) has a
:class:`Treatment` here:

* **ours**: lmcached has the same key, or an equivalent one (``cache_policy`` → ``eviction_policy``);
* **ignored**: a no-op with one warning naming the key and why, given only when the value asks for
  something (it differs from LMCache's default: ``enable_blending: false`` says nothing);
* **connector**: a setting of LMCache's vLLM connector that lmcached's connector reads from the
  same places (:data:`CONNECTOR_KEYS`); the daemon accepts it silently;
* **refused**: the key would change what the engine computes or where its data must go, and
  lmcached cannot honour it: a one-line error saying what to do instead.

This is a leaf module (no lmcached imports): :mod:`lmcached.config` applies the table, the docs
generator renders it (docs/migrating-from-lmcache.md), and the vLLM connector maps its
``lmcache.*`` keys with :func:`map_lmcache_connector_keys`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
LMCACHE_VERSION = "0.5.6"


@dataclass(frozen=True)
class Outcome:
    """What one LMCache key's value does: set our keys, warn, or fail (one line each)."""

    updates: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Treatment:
    """How lmcached handles one LMCache key; ``apply`` turns a value into an Outcome."""

    kind: str  # "ours", "ignored" or "refused"
    summary: str  # one line for the migration guide
    apply: Callable[[Any], Outcome]
    # True: lmcached's key of the same name takes the value as it is.
    same_key: bool = False


def _is_default(value: Any, default: Any) -> bool:
    if value is None or (isinstance(value, (str, list, dict)) and not value and default is None):
        return True  # null, '' or [] where LMCache's default is unset: nothing is asked for
    if isinstance(default, bool) or isinstance(value, bool):
        return value is default or (
            isinstance(value, str) and value.lower() == str(default).lower()
        )
    return bool(value == default)


def same() -> Treatment:
    """The LMCache key is lmcached's key of the same name, with the same meaning and units."""
    return Treatment("ours", "same key", lambda _value: Outcome(), same_key=True)


def ignored(default: Any, why: str) -> Treatment:
    """A no-op: warn once, naming why, when the value is not LMCache's ``default``."""

    def apply(value: Any) -> Outcome:
        return Outcome() if _is_default(value, default) else Outcome(warning=f"ignored: {why}")

    return Treatment("ignored", f"(warns unless {_show(default)}): {why}", apply)


def refused(default: Any, why: str) -> Treatment:
    """An error saying what to do instead, when the value is not LMCache's ``default``."""

    def apply(value: Any) -> Outcome:
        return Outcome() if _is_default(value, default) else Outcome(error=why)

    return Treatment("refused", f"(unless {_show(default)}): {why}", apply)


def connector(summary: str) -> Treatment:
    """A key of LMCache's vLLM connector: the lmcached connector reads it, the daemon does not.

    The connector finds it where LMCache's connector does (``LMCACHE_CONFIG_FILE``,
    ``LMCACHE_<KEY>``, ``lmcache.<key>`` in ``kv_connector_extra_config``), so the daemon, which
    may read the same file, says nothing about it.
    """
    return Treatment("connector", summary, lambda _value: Outcome())


def _show(default: Any) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "`false`" if default is False else "`true`"
    if isinstance(default, float) and math.isinf(default):
        return "`inf`"
    return f"`{default!r}`" if isinstance(default, str) else f"`{default}`"


# --- value converters of mapped keys -------------------------------------------------------------

# LMCache's cache_policy names the CPU tier's eviction policy (not the write policy).
_EVICTION_NAMES = {"lru": "lru", "s3fifo": "s3fifo", "s3-fifo": "s3fifo"}


def _cache_policy(value: Any) -> Outcome:
    name = str(value).strip().lower()
    if name in _EVICTION_NAMES:
        return Outcome(updates={"eviction_policy": _EVICTION_NAMES[name]})
    return Outcome(
        warning=f"ignored: eviction policy {value!r} has no lmcached equivalent; eviction_policy "
        "lru applies (eviction_policy: s3fifo resists one-time scans)"
    )


def _plugin_locations(value: Any) -> Outcome:
    return Outcome(updates={"plugin_locations": value})


# --- reasons, shared by the keys of one LMCache feature ------------------------------------------


_BLEND = "CacheBlend (reusing non-prefix chunks) is not supported; lmcached serves prefix hits only"
_P2P = (
    "peer-to-peer transfer between engines is not used; engines on one host share its daemon, "
    "hosts share the remote tier (remote_url)"
)
_CONTROLLER = (
    "LMCache's controller is not used; manage lmcached with its CLI (status, purge, reload) "
    "and /metrics"
)
_PD = (
    "disaggregated prefill (sending KV from a prefill to a decode instance) is not an lmcached "
    "feature; use vLLM's NixlConnector for it and lmcached for prefix caching"
)
_PD_KEY = "a disaggregated-prefill setting; lmcached has no disaggregated prefill"
_MP = (
    "LMCache's multi-process server address; the lmcached daemon listens on its ipc endpoints "
    "(runtime_dir) and on host/port when enabled"
)
_GDS = "GPUDirect Storage is not supported; use local_disk for a disk tier"
_MARU = "the CXL shared-memory backend is not supported"
_API = (
    "LMCache's internal API server is not provided; lmcached serves /metrics and /healthz on "
    "metrics_port"
)
_LAZY = "lmcached's CPU tier allocates on demand up to max_local_cpu_size"
_STATS = "chunk statistics are not collected; see /metrics and `lmcached status`"
_HIDDEN = "hidden-state caching (vLLM-Omni) is not supported; lmcached caches KV blocks only"
_PIN = "LMCache's PinMonitor does not exist in lmcached; the daemon owns every block it serves"
_SCRIPT = (
    "LMCache's /run_script API is not provided; lmcached runs script plugins (plugin_locations)"
)
_LOOKUP = (
    "a lookup is one request bounded by the caller's deadline: request_timeout (seconds) for "
    "clients, lmcached.lookup_timeout in the vLLM connector"
)

# Every key of LMCache 0.5.6's _CONFIG_DEFINITIONS, in its order. The defaults given to ignored()
# and refused() are LMCache's (a test compares them with the fixture).
LMCACHE_KEYS: dict[str, Treatment] = {
    "chunk_size": same(),
    "local_cpu": same(),
    "max_local_cpu_size": same(),
    "local_cpu_use_hugepages": ignored(False, "the CPU tier uses ordinary pages"),
    "reserve_local_cpu_size": ignored(
        0.0, "nothing is reserved beyond max_local_cpu_size; lower it to leave memory free"
    ),
    "local_disk": same(),
    "local_disk_path_sharding": ignored(
        "by_gpu", "the disk tier is shared by all GPUs; worker i uses <local_disk>/<i>"
    ),
    "max_local_disk_size": same(),
    "remote_url": same(),
    "remote_serde": same(),
    "use_layerwise": connector("`lmcached.load_mode` (`true` → layerwise, `false` → sync)"),
    "save_decode_cache": ignored(False, "only prompt (prefill) chunks are stored"),
    "pre_caching_hash_algorithm": ignored(
        "builtin", "keys are built by lmcached.keys (docs/keys.md), the same in every process"
    ),
    "enable_blending": ignored(False, _BLEND),
    "blend_recompute_ratios": ignored(None, _BLEND),
    "blend_thresholds": ignored(None, _BLEND),
    "blend_check_layers": ignored(None, _BLEND),
    "blend_min_tokens": ignored(256, _BLEND),
    "blend_special_str": ignored(" # # ", _BLEND),
    "retrieve_locations": ignored(
        None, "every tier is read, CPU first, then disk, then remote (write_policy says where)"
    ),
    "store_location": ignored(
        None, "every configured tier is written; write_policy says when (docs/tiers.md)"
    ),
    "enable_p2p": ignored(False, _P2P),
    "p2p_host": ignored(None, _P2P),
    "p2p_init_ports": ignored(None, _P2P),
    "p2p_lookup_ports": ignored(None, _P2P),
    "mp_host": ignored(None, _MP),
    "mp_port": ignored(5555, _MP),
    "enable_controller": ignored(False, _CONTROLLER),
    "lmcache_instance_id": ignored(None, _CONTROLLER),
    "controller_pull_url": ignored(None, _CONTROLLER),
    "controller_reply_url": ignored(None, _CONTROLLER),
    "lmcache_worker_ports": ignored(None, _CONTROLLER),
    "lmcache_worker_ids": ignored(None, _CONTROLLER),
    "lmcache_worker_heartbeat_delay_time": ignored(10, _CONTROLLER),
    "lmcache_worker_heartbeat_time": ignored(None, _CONTROLLER),
    "enable_pd": refused(False, _PD),
    "pd_role": ignored(None, _PD_KEY),
    "pd_buffer_size": ignored(None, _PD_KEY),
    "pd_buffer_device": ignored(None, _PD_KEY),
    "pd_peer_host": ignored(None, _PD_KEY),
    "pd_peer_init_port": ignored(None, _PD_KEY),
    "pd_peer_alloc_port": ignored(None, _PD_KEY),
    "pd_peer_query_port": ignored(None, _PD_KEY),
    "pd_proxy_host": ignored(None, _PD_KEY),
    "pd_proxy_port": ignored(None, _PD_KEY),
    "pd_allocation_timeout_sec": ignored(math.inf, _PD_KEY),
    "pd_shutdown_timeout_sec": ignored(5.0, _PD_KEY),
    "pd_condition_poll_interval_sec": ignored(0.005, _PD_KEY),
    "pd_max_prefill_len": ignored(0, _PD_KEY),
    "pd_backend_mode": ignored("async", _PD_KEY),
    "pd_skip_proxy_notification": ignored(False, _PD_KEY),
    "pd_bidirectional": ignored(False, _PD_KEY),
    "transfer_channel": ignored(None, _P2P),
    "nixl_backends": ignored(None, _PD_KEY),
    "nixl_buffer_size": ignored(None, _PD_KEY),
    "nixl_buffer_device": ignored(None, _PD_KEY),
    "gds_path": ignored(None, _GDS),
    "gds_path_sharding": ignored("by_gpu", _GDS),
    "gds_buffer_size": ignored(None, _GDS),
    "maru_path": ignored(None, _MARU),
    "maru_pool_size": ignored(4.0, _MARU),
    "use_gds": ignored(True, _GDS),
    "gds_backend": ignored("cufile", _GDS),
    "audit_actual_remote_url": ignored(None, "the audit connector is not provided"),
    "internal_api_server_host": ignored("127.0.0.1", _API),
    "extra_config": same(),
    "save_unfull_chunk": connector(
        "`lmcached.save_partial_chunks` (a prompt's trailing partial chunk is stored)"
    ),
    "blocking_timeout_secs": ignored(
        10, "every request has a deadline: request_timeout (client), remote_timeout (remote)"
    ),
    "external_lookup_client": ignored(
        None, "lookups are answered by the daemon that owns the key, in one round trip"
    ),
    "py_enable_gc": ignored(True, "the daemon's processes keep Python's default GC"),
    "cache_policy": Treatment(
        "ours",
        "`eviction_policy` (LRU → lru; S3FIFO → s3fifo; others warn, lru applies)",
        _cache_policy,
    ),
    "numa_mode": ignored(None, "memory is not bound to NUMA nodes"),
    "enable_async_loading": connector(
        "(warns unless `false`): there is no asynchronous load; loads are layer-wise "
        "(`lmcached.load_mode: layerwise`, the default on a GPU), overlapping the forward pass"
    ),
    "internal_api_server_enabled": ignored(False, _API),
    "internal_api_server_port_start": ignored(6999, _API),
    "priority_limit": ignored(None, "every request is cached, whatever its priority"),
    "internal_api_server_include_index_list": ignored(None, _API),
    "internal_api_server_socket_path_prefix": ignored(None, _API),
    "runtime_plugin_locations": Treatment(
        "ours", "`plugin_locations` (script plugins)", _plugin_locations
    ),
    "storage_plugins": same(),
    "remote_storage_plugins": ignored(
        None,
        "remote connectors are registry entries: package yours as a remote_connector plugin "
        "(docs/extensions.md) and name its scheme in remote_url",
    ),
    "lookup_timeout_ms": ignored(3000, _LOOKUP),
    "min_retrieve_tokens": ignored(
        0, "the vLLM connector loads every hit, however short, to the token"
    ),
    "hit_miss_ratio": ignored(None, "a testing knob of LMCache; lmcached never fakes misses"),
    "lookup_server_worker_ids": ignored(
        None, "every engine worker asks the daemon directly; there is no lookup server"
    ),
    "enable_scheduler_bypass_lookup": ignored(
        False, "every engine worker asks the daemon directly; there is no lookup server"
    ),
    "script_allowed_imports": ignored(None, _SCRIPT),
    "run_script_api_enabled": ignored(False, _SCRIPT),
    "enable_lazy_memory_allocator": ignored(False, _LAZY),
    "lazy_memory_initial_ratio": ignored(0.2, _LAZY),
    "lazy_memory_expand_trigger_ratio": ignored(0.5, _LAZY),
    "lazy_memory_step_ratio": ignored(0.1, _LAZY),
    "lazy_memory_safe_size": ignored(0.0, _LAZY),
    "enable_chunk_statistics": ignored(False, _STATS),
    "chunk_statistics_auto_start_statistics": ignored(False, _STATS),
    "chunk_statistics_auto_exit_timeout_hours": ignored(0.0, _STATS),
    "chunk_statistics_auto_exit_target_unique_chunks": ignored(0, _STATS),
    "chunk_statistics_strategy": ignored("memory_bloom_filter", _STATS),
    "enable_kv_events": ignored(False, "KV events are not published; see /metrics"),
    "use_gpu_connector_v3": ignored(False, "the vLLM connector copies blocks its own way"),
    "pin_timeout_sec": ignored(300, _PIN),
    "pin_check_interval_sec": ignored(30, _PIN),
    "remote_config_url": refused(
        None,
        "lmcached does not fetch its config from a service; put the keys in this file "
        "(`lmcached config check` validates it)",
    ),
    "app_id": ignored(None, "used only with remote_config_url, which lmcached does not fetch"),
    "enable_hidden_state_cache": refused(
        False, f"{_HIDDEN}; keep LMCache for vLLM-Omni pipelines, or set it to false"
    ),
    "max_hidden_state_cpu_size": ignored(2.0, _HIDDEN),
    "hidden_state_layers": ignored(None, _HIDDEN),
    "hidden_states_retrieve_mode": ignored("prefix_strict", _HIDDEN),
}

# LMCache's _CONFIG_ALIASES (old name -> current name), as in 0.5.6.
LMCACHE_ALIASES: dict[str, str] = {
    "enable_xpyd": "enable_pd",
    "nixl_peer_host": "pd_peer_host",
    "nixl_peer_init_port": "pd_peer_init_port",
    "nixl_peer_alloc_port": "pd_peer_alloc_port",
    "nixl_proxy_host": "pd_proxy_host",
    "nixl_proxy_port": "pd_proxy_port",
    "nixl_buffer_size": "pd_buffer_size",
    "nixl_role": "pd_role",
    "controller_url": "controller_pull_url",
    "lmcache_worker_port": "lmcache_worker_ports",
    "plugin_locations": "runtime_plugin_locations",
    "external_backends": "storage_plugins",
}

# LMCache's extra_config keys that lmcached reads or knows to be LMCache-only. Other extra_config
# keys stay free-form settings of extensions.
_EXTRA_NIXL = "an LMCache NIXL storage setting; lmcached has no NIXL backend"
_EXTRA_CLOUD = "an LMCache cloud-storage connector setting; lmcached has no such connector"
LMCACHE_EXTRA_KEYS: dict[str, Treatment] = {
    "use_odirect": Treatment(
        "ours",
        "`disk_drop_cache: true` (the disk tier keeps its files out of the page cache)",
        lambda v: Outcome(updates={"disk_drop_cache": True}) if _truthy(v) else Outcome(),
    ),
    "use_direct_io": Treatment(
        "ours",
        "`disk_drop_cache: true` (the disk tier keeps its files out of the page cache)",
        lambda v: Outcome(updates={"disk_drop_cache": True}) if _truthy(v) else Outcome(),
    ),
    "save_chunk_meta": ignored(
        True, "every stored block carries its meta (docs/format.md); it cannot be turned off"
    ),
    "redis_url": ignored(None, "name the Redis server in remote_url"),
    "remote_storage_plugin.redis.redis_url": ignored(None, "name the Redis server in remote_url"),
    "valkey_mode": ignored(
        "standalone", "use remote_url: redis-cluster://host:port,... for a cluster"
    ),
    "valkey_username": ignored(None, "put credentials in the URL: valkey://user:password@host"),
    "valkey_password": ignored(None, "put credentials in the URL: valkey://user:password@host"),
    "valkey_database": ignored(None, "put the database in the URL: valkey://host:6379/0"),
    "valkey_enable_ttl": ignored(False, "set remote_ttl (seconds)"),
    "valkey_ttl_sec": ignored(None, "set remote_ttl (seconds)"),
    "valkey_num_workers": ignored(None, "each worker owns one connection to the remote"),
    "valkey_sync_num_workers": ignored(None, "each worker owns one connection to the remote"),
    "resp_num_threads": ignored(None, "each worker owns one connection to the remote"),
    "lmcache_rpc_port": ignored(None, _MP),
    "heartbeat_url": ignored(None, _CONTROLLER),
    "enable_nixl_storage": ignored(False, _EXTRA_NIXL),
    "nixl_backend": ignored(None, _EXTRA_NIXL),
    "nixl_path": ignored(None, _EXTRA_NIXL),
    "nixl_pool_size": ignored(None, _EXTRA_NIXL),
    "nixl_use_hugepages": ignored(None, _EXTRA_NIXL),
    "nixl_presence_cache": ignored(None, _EXTRA_NIXL),
    "s3_region": ignored(None, _EXTRA_CLOUD),
    "s3_num_io_threads": ignored(None, _EXTRA_CLOUD),
    "s3_prefer_http2": ignored(None, _EXTRA_CLOUD),
    "s3_enable_s3express": ignored(None, _EXTRA_CLOUD),
    "audit_verify_checksum": ignored(None, "the audit connector is not provided"),
}


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"true", "yes", "on", "1"}
    return bool(value)


def resolve(name: str) -> str:
    """Return LMCache's current name for ``name`` (its alias target, or itself)."""
    return LMCACHE_ALIASES.get(name, name)


def is_lmcache_key(name: str) -> bool:
    """Return True for a key or alias of LMCache's schema."""
    return resolve(name) in LMCACHE_KEYS


def apply(name: str, value: Any) -> Outcome:
    """Return what LMCache key (or alias) ``name`` set to ``value`` does in lmcached."""
    key = resolve(name)
    treatment = LMCACHE_KEYS[key]
    if treatment.same_key:
        return Outcome(updates={key: value})
    return treatment.apply(value)


def apply_extra(name: str, value: Any) -> Outcome | None:
    """Return what LMCache's ``extra_config`` key ``name`` does, or None for an unknown key."""
    treatment = LMCACHE_EXTRA_KEYS.get(name)
    return treatment.apply(value) if treatment else None


# --- remote URL schemes ---------------------------------------------------------------------------

# LMCache schemes lmcached has no connector for, each with the nearest alternative.
UNSUPPORTED_SCHEMES: dict[str, str] = {
    "lm": "run one lmcached daemon per host and share hosts through redis:// or fs://",
    "mooncakestore": "use redis:// (or redis-cluster://) for a shared remote tier",
    "infinistore": "use redis:// (or redis-cluster://) for a shared remote tier",
    "blackhole": "leave remote_url unset for no remote tier",
    "mock": "leave remote_url unset, or run a local redis-server for tests",
    "audit": "use redis:// and `lmcached check` to verify stored blocks",
    "resp": "use redis:// (the same protocol)",
    "s3": "use fs:// on a mounted bucket, or redis:// for a shared remote tier",
    "azure": "use fs:// on a mounted container, or redis:// for a shared remote tier",
    "hf3fs": "use fs:///path on the 3FS mount",
    "eic": "use redis:// (or redis-cluster://) for a shared remote tier",
    "sagemaker-hyperpod": "use redis:// (or redis-cluster://) for a shared remote tier",
    "external": "package the connector as a remote_connector plugin (docs/extensions.md)",
    "plugin": "package the connector as a remote_connector plugin (docs/extensions.md)",
}


def unsupported_scheme_message(scheme: str) -> str | None:
    """Return the one-line refusal of LMCache scheme ``scheme``, or None when it is not one."""
    hint = UNSUPPORTED_SCHEMES.get(scheme.lower())
    if hint is None:
        return None
    return f"LMCache's {scheme}:// connector is not supported by lmcached; {hint}"


# --- the vLLM connector's kv_connector_extra_config --------------------------------------------


def _strict_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "on", "1"}:
        return True
    if text in {"false", "no", "off", "0"}:
        return False
    raise ValueError("expected true or false")


def _save_unfull_chunk(value: Any) -> Outcome:
    return Outcome(updates={"lmcached.save_partial_chunks": _strict_bool(value)})


def _use_layerwise(value: Any) -> Outcome:
    return Outcome(updates={"lmcached.load_mode": "layerwise" if _strict_bool(value) else "sync"})


def _enable_async_loading(value: Any) -> Outcome:
    if not _strict_bool(value):
        return Outcome()
    return Outcome(
        warning="ignored: there is no asynchronous load; loads are layer-wise instead "
        "(lmcached.load_mode: layerwise, the default), each layer waiting only for its own KV"
    )


def _seconds_from_ms(value: Any) -> Outcome:
    return Outcome(updates={"lmcached.lookup_timeout": float(value) / 1000.0})


# LMCache's connector keys with an lmcached connector equivalent (``lmcache.<name>`` in
# kv_connector_extra_config): name -> what a value does, as ``lmcached.*`` settings.
_CONNECTOR_EQUIVALENTS: dict[str, Callable[[Any], Outcome]] = {
    "chunk_size": lambda v: Outcome(updates={"lmcached.chunk_size": int(v)}),
    "lookup_timeout_ms": _seconds_from_ms,
    "blocking_timeout_secs": lambda v: Outcome(updates={"lmcached.timeout": float(v)}),
    "save_unfull_chunk": _save_unfull_chunk,
    "use_layerwise": _use_layerwise,
    "enable_async_loading": _enable_async_loading,
}

# The keys of LMCache's connector features, which LMCache users keep in the file LMCache's
# connector reads (LMCACHE_CONFIG_FILE) or in LMCACHE_<KEY>: the lmcached connector reads these
# there too (and only these: the rest of such a file is the daemon's).
CONNECTOR_KEYS = ("save_unfull_chunk", "use_layerwise", "enable_async_loading")

EXTRA_CONFIG = "kv_connector_extra_config"


def lmcache_connector_entries(
    environ: Mapping[str, str],
) -> tuple[dict[str, tuple[Any, str]], list[str]]:
    """Read :data:`CONNECTOR_KEYS` where LMCache's connector reads them.

    Returns (``lmcache.<key>`` -> (value, where it came from), warnings). As in LMCache, the file
    named by ``LMCACHE_CONFIG_FILE`` comes first and ``LMCACHE_<KEY>`` overrides it. A file that
    cannot be read is a warning, not an error: it is the daemon's file, and an engine must not
    fail over it.
    """
    import yaml  # only when a connector starts

    found: dict[str, tuple[Any, str]] = {}
    warnings: list[str] = []
    path = environ.get(CONFIG_FILE_ENV)
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc).replace("\n", " ")
            warnings.append(
                f"{CONFIG_FILE_ENV}={path}: cannot read it ({reason}); its connector keys "
                f"({', '.join(CONNECTOR_KEYS)}) are not applied"
            )
            data = {}
        if isinstance(data, Mapping):
            for name in CONNECTOR_KEYS:
                if data.get(name) is not None:
                    found[f"lmcache.{name}"] = (data[name], path)
    for name in CONNECTOR_KEYS:
        env_name = ENV_PREFIX + name.upper()
        raw = environ.get(env_name)
        if raw is not None and raw.strip():
            text = raw.strip()
            if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
                text = text[1:-1]  # LMCache unquotes
            found[f"lmcache.{name}"] = (text, f"env {env_name}")
    return found, warnings


def map_lmcache_connector_keys(
    extra: Mapping[str, Any],
    inherited: Mapping[str, tuple[Any, str]] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Map the ``lmcache.*`` keys of vLLM's ``kv_connector_extra_config`` to ``lmcached.*`` ones.

    Returns (the ``lmcached.*`` settings, one warning per ``lmcache.*`` key without an
    equivalent, or with a value that cannot be used). Keys that are not ``lmcache.*`` are not
    looked at; an explicit ``lmcached.*`` key wins over the mapped one. ``inherited`` holds
    ``lmcache.*`` values from LMCache's file and environment (:func:`lmcache_connector_entries`)
    with where each came from; a key in ``extra`` wins over them, as in LMCache.
    """
    entries: dict[str, tuple[Any, str]] = dict(inherited or {})
    entries.update(
        (key, (value, EXTRA_CONFIG)) for key, value in extra.items() if key.startswith("lmcache.")
    )
    settings: dict[str, Any] = {}
    warnings: list[str] = []
    for key, (value, where) in entries.items():
        name = key[len("lmcache.") :]
        equivalent = _CONNECTOR_EQUIVALENTS.get(name)
        if equivalent is not None:
            try:
                outcome = equivalent(value)
            except (TypeError, ValueError) as exc:
                warnings.append(f"{where}: {key}={value!r}: ignored: {exc}")
                continue
            if outcome.warning:
                warnings.append(f"{where}: {key}: {outcome.warning}")
            for ours_key, ours_value in outcome.updates.items():
                if ours_key not in extra:
                    settings[ours_key] = ours_value
            continue
        if name.startswith("mp."):
            why = _MP + "; set lmcached.endpoint or lmcached.config instead"
        elif is_lmcache_key(name):
            treatment = LMCACHE_KEYS[resolve(name)]
            why = (
                "a daemon setting: put it in the lmcached daemon's config file"
                if treatment.kind == "ours"
                else treatment.summary.split(": ", 1)[-1]
            )
        else:
            why = "not an LMCache config key lmcached knows"
        warnings.append(f"{where}: {key}: ignored: {why}")
    return settings, warnings
