"""Load, validate and describe the daemon's configuration.

Every key is one field of :class:`Config`, declared with :func:`option`: its converter, its
documentation and whether it holds a secret. Values come from YAML, then LMCache's
``LMCACHE_<KEY>``, then ``LMCACHED_<KEY>`` environment overrides. Every value passes through its
named converter at load time, so a bad value fails at start with one line naming the key and
where the value came from, never in the hot path; every such problem is reported in one pass.

Key names and units follow LMCache where LMCache has the key (``chunk_size``,
``max_local_cpu_size`` in GiB, ``local_disk``, ``remote_url`` ...). Every other key of LMCache's
schema is mapped, ignored with a warning, or refused by :mod:`lmcached.config_lmcache`, so an
LMCache user's file runs as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import yaml

from lmcached import config_lmcache
from lmcached.errors import ConfigError, ConfigErrors
from lmcached.protocol import Limits
from lmcached.runtime import default_runtime_dir, derived_instance_name

ENV_PREFIX = "LMCACHED_"
GIB = 1 << 30

Converter = Callable[[Any], Any]


# --------------------------------------------------------------------------------------------
# Named converters. Each raises ValueError with a sentence saying what was expected.
# --------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def byte_size(value: Any) -> int:
    """Convert a size to bytes: a number means GiB (as in LMCache); '512MiB', '2GB' carry units."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 2.5 (GiB) or '512MiB', got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"expected a non-negative size, got {value!r}")
        return int(value * GIB)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, unit = m.groups()
            unit_bytes = _SIZE_UNITS.get(unit.lower())
            if unit_bytes is not None:
                # A bare number in a string still means GiB, like the YAML number would.
                return int(float(number) * (unit_bytes if unit else GIB))
    raise ValueError(f"expected a size such as 2.5 (GiB) or '512MiB', got {value!r}")


def format_size(n: int) -> str:
    """Render bytes with an exact unit ('2GiB', '512MiB', '1000B'); byte_size reads it back."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"


def positive_int(value: Any) -> int:
    """Convert to an int greater than zero."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def non_negative_int(value: Any) -> int:
    """Convert to an int of zero or more."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an integer >= 0, got {value!r}")
    return value


def port_number(value: Any) -> int:
    """Convert to a TCP port; 0 asks the OS for an ephemeral port."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"expected a port number 0..65535 (0 = ephemeral), got {value!r}")
    return value


def seconds(value: Any) -> float:
    """Convert to a duration in seconds (> 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a duration in seconds > 0, got {value!r}")
    return float(value)


def non_negative_seconds(value: Any) -> float:
    """Convert to a duration in seconds (>= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected a duration in seconds >= 0, got {value!r}")
    return float(value)


def boolean(value: Any) -> bool:
    """Convert to a bool; accepts YAML booleans and the strings true/false/yes/no/1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"true", "yes", "on", "1"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"false", "no", "off", "0"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def string(value: Any) -> str:
    """Convert to a string (numbers are not silently accepted)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def optional_string(value: Any) -> str | None:
    """Convert to a string, or None when null or empty."""
    if value is None or value == "":
        return None
    return string(value)


def optional_path(value: Any) -> str | None:
    """Convert to an absolute path string with ~ expanded, or None when null or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.startswith("file://"):
        value = value[len("file://") :]
    return str(Path(string(value)).expanduser().absolute())


def path_list(value: Any) -> list[str]:
    """Convert a path or a list of paths to a list of absolute path strings."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"expected a path or a list of paths, got {value!r}")
    out = []
    for item in items:
        p = optional_path(item)
        if p is None:
            raise ValueError(f"expected a path or a list of paths, got {value!r}")
        out.append(p)
    return out


def string_list(value: Any) -> list[str]:
    """Convert a list of strings (a single string becomes a one-item list)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(items)


def mapping(value: Any) -> dict[str, Any]:
    """Convert to a mapping with string keys."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"expected a mapping with string keys, got {value!r}")
    return dict(value)


def choice(*allowed: str) -> Converter:
    """Build a converter that accepts one of ``allowed`` (case-insensitive)."""

    def convert(value: Any) -> str:
        if isinstance(value, str) and value.lower() in allowed:
            return value.lower()
        raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")

    convert.__name__ = f"choice({', '.join(allowed)})"
    return convert


def optional_url(value: Any) -> str | None:
    """Convert to a URL with a scheme (scheme://...), or None when null or empty."""
    if value is None or value == "":
        return None
    s = string(value)
    if "://" not in s or not urlsplit(s).scheme:
        raise ValueError(f"expected a URL such as redis://host:6379, got {value!r}")
    return s


def bind_host(value: Any) -> str:
    """Convert to a host name or IP address to bind."""
    s = string(value).strip()
    if not s or any(c in s for c in "/ \t"):
        raise ValueError(f"expected a host name or IP address, got {value!r}")
    return s


def optional_port(value: Any) -> int | None:
    """Convert to a TCP port, or None (null) to disable the listener."""
    if value is None or value == "":
        return None
    return port_number(value)


def quota_map(value: Any) -> dict[str, int]:
    """Convert a mapping of namespace -> byte size (a number is GiB)."""
    out: dict[str, int] = {}
    for name, size in mapping(value).items():
        if not name or "/" in name:
            raise ValueError(f"a namespace is a key prefix without '/', got {name!r}")
        try:
            out[name] = byte_size(size)
        except ValueError as exc:
            raise ValueError(f"namespace {name!r}: {exc}") from None
    return out


# --- script plugins --------------------------------------------------------------------------

PLUGIN_RESTART_POLICIES = ("never", "on-failure", "always")
_PLUGIN_RLIMIT_CONVERTERS: dict[str, Converter] = {
    "memory": byte_size,
    "cpu_seconds": positive_int,
    "open_files": positive_int,
}


def _plugin_rlimits(value: Any) -> dict[str, int]:
    limits = mapping(value)
    out = {}
    for name, raw in limits.items():
        convert = _PLUGIN_RLIMIT_CONVERTERS.get(name)
        if convert is None:
            known = ", ".join(_PLUGIN_RLIMIT_CONVERTERS)
            raise ValueError(f"unknown rlimit '{name}' (known: {known})")
        try:
            out[name] = convert(raw)
        except ValueError as exc:
            raise ValueError(f"rlimits.{name}: {exc}") from None
    return out


_PLUGIN_ENTRY_CONVERTERS: dict[str, Converter] = {
    "restart": choice(*PLUGIN_RESTART_POLICIES),
    "max_retries": non_negative_int,
    "backoff": seconds,
    "start_seconds": non_negative_seconds,
    "enabled": boolean,
    "rlimits": _plugin_rlimits,
    "settings": mapping,
}


def plugin_config_map(value: Any) -> dict[str, dict[str, Any]]:
    """Convert the per-plugin settings mapping ``{file name: {restart: ..., ...}}``."""
    entries = mapping(value)
    out: dict[str, dict[str, Any]] = {}
    for plugin_name, entry in entries.items():
        if "/" in plugin_name:
            raise ValueError(
                f"plugin_config is keyed by plugin file name, got a path {plugin_name!r}"
            )
        if not isinstance(entry, Mapping):
            raise ValueError(f"{plugin_name}: expected a mapping of settings, got {entry!r}")
        converted: dict[str, Any] = {}
        for key, raw in entry.items():
            convert = _PLUGIN_ENTRY_CONVERTERS.get(key)
            if convert is None:
                close = difflib.get_close_matches(str(key), list(_PLUGIN_ENTRY_CONVERTERS), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"{plugin_name}: unknown setting '{key}'{hint}")
            try:
                converted[key] = convert(raw)
            except ValueError as exc:
                raise ValueError(f"{plugin_name}.{key}: {exc}") from None
        out[plugin_name] = converted
    return out


# --------------------------------------------------------------------------------------------
# The schema.
# --------------------------------------------------------------------------------------------


def option(
    default: Any,
    convert: Converter,
    doc: str,
    *,
    secret: bool = False,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one config key: its default, named converter and one-line documentation."""
    meta = {"convert": convert, "doc": doc, "secret": secret}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """The effective configuration of one daemon (after YAML and env overrides)."""

    # --- core: processes and endpoints -----------------------------------------------------
    num_workers: int = option(2, positive_int, "Worker processes; each owns 1/N of the keys.")
    enable_tcp: bool = option(
        False,
        boolean,
        "Also listen on TCP (host, port), for off-host clients and benchmarks. TCP always runs "
        "CURVE: without curve_secret_key_file the daemon generates its keys in the runtime "
        "folder. Off: clients use the ipc sockets of the runtime folder only.",
    )
    host: str = option(
        "127.0.0.1", bind_host, "Address the TCP control and data endpoints bind (enable_tcp)."
    )
    port: int = option(
        7470,
        port_number,
        "Control port; worker i binds port+1+i. 0 makes every port ephemeral "
        "(the real ones are written to the runtime file).",
    )
    runtime_dir: str = option(
        None,
        optional_path,
        "Folder for ipc sockets, the lock and the endpoints file. "
        "Default: $XDG_RUNTIME_DIR/lmcached, else /tmp/lmcached-<uid>.",
    )
    instance_name: str | None = option(
        None,
        optional_string,
        "Subfolder of runtime_dir for this daemon. Default: derived from the config file path, "
        "so two daemons with different configs never collide.",
    )
    # --- core: KV blocks ---------------------------------------------------------------------
    chunk_size: int = option(256, positive_int, "Tokens per KV block (LMCache's chunk_size).")
    local_cpu: bool = option(True, boolean, "Keep blocks in the CPU-memory tier.")
    max_local_cpu_size: int = option(
        2.0, byte_size, "CPU tier budget, split evenly across workers. A number is GiB."
    )
    eviction_policy: str = option(
        "lru",
        string,
        "Eviction policy of the CPU tier, by name (LMCache's cache_policy maps here).",
    )
    shared_memory: bool = option(
        True,
        boolean,
        "Keep each worker's CPU tier in a shared-memory arena that same-host clients map "
        "read-only (docs/same-host.md); off: blocks stay in the worker's heap, ZMQ only.",
    )
    direct_put: bool = option(
        True,
        boolean,
        "Let a same-host client's put be one copy: the worker reads each block from the "
        "client's memory (process_vm_readv, where the kernel allows it) straight into its "
        "arena (docs/same-host.md). Off: clients stage their blocks first (two copies).",
    )
    lease_timeout: float = option(
        30.0,
        seconds,
        "How long a zero-copy view from a same-host get keeps its slot from reuse if never "
        "released; a reader past it gets an error, never other bytes.",
    )
    # --- core: limits ------------------------------------------------------------------------
    max_block_size: int = option("64MiB", byte_size, "Largest accepted block payload.")
    max_keys_per_batch: int = option(4096, positive_int, "Most keys in one request.")
    max_key_length: int = option(512, positive_int, "Longest accepted key, in bytes.")
    max_meta_bytes: int = option(
        "64KiB",
        byte_size,
        "Largest accepted metadata of one block, msgpack-encoded (at most 1MiB, the block "
        "format's limit). Clients check it before sending; workers refuse larger ones.",
    )
    max_inflight_bytes: int = option(
        "64MiB",
        byte_size,
        "Most request bytes a worker's I/O pool holds (queued or running); a request that "
        "would pass it gets a 'busy' reply. Also the most bytes of puts in progress or waiting "
        "behind one (past it the worker reads no more until one ends), the largest single "
        "request, and what one client connection may have unacknowledged.",
    )
    io_queue_depth: int = option(
        256,
        positive_int,
        "Most disk/remote jobs a worker's I/O pool holds, running or queued; a request that "
        "needs one more gets a 'busy' reply.",
    )
    wire_frame_size: int = option(
        "16MiB",
        byte_size,
        "Blocks larger than this travel as several sub-frames (keeps libzmq's buffers below "
        "glibc's mmap threshold).",
    )
    request_timeout: float = option(10.0, seconds, "Default deadline of a client call.")
    # --- core: supervision and logging -------------------------------------------------------
    worker_start_timeout: float = option(
        20.0, seconds, "How long a worker may take to report ready."
    )
    worker_start_attempts: int = option(
        5,
        positive_int,
        "Consecutive failed starts of one worker (it exits or times out before it serves) "
        "after which the daemon gives up and exits with the reason.",
    )
    worker_restart_backoff: float = option(
        0.2, seconds, "First delay before restarting a crashed worker; doubles up to 10 s."
    )
    shutdown_timeout: float = option(
        5.0, seconds, "How long workers get to exit after SIGTERM before SIGKILL."
    )
    log_level: str = option(
        "info", choice("debug", "info", "warning", "error"), "Log level of every process."
    )
    log_format: str = option(
        "auto", choice("auto", "console", "json"), "auto: readable on a TTY, JSON otherwise."
    )
    # --- tiers: disk, remote, write policy (README: "Tiers") ---------
    local_disk: str | None = option(
        None,
        optional_path,
        "Folder of the disk tier (LMCache's local_disk; file:// accepted); worker i uses "
        "<local_disk>/<i>/. Unset: no disk tier.",
    )
    max_local_disk_size: int = option(
        0, byte_size, "Disk tier budget, split evenly across workers. A number is GiB."
    )
    disk_fsync: bool = option(
        False,
        boolean,
        "fdatasync each disk block before it becomes visible, so it survives a power loss "
        "(a kill -9 is survived either way).",
    )
    disk_drop_cache: bool = option(
        False,
        boolean,
        "posix_fadvise(DONTNEED) after disk reads and writes, so the page cache does not grow "
        "with the disk tier (a write then also pays an fdatasync, on the write-through thread).",
    )
    disk_mmap_reads: bool = option(
        True,
        boolean,
        "Ignored (kept so old configs load): disk reads always copy into the worker's memory "
        "and verify that copy, so a file changed or truncated underneath is never served.",
    )
    remote_url: str | None = option(
        None,
        optional_url,
        "Shared remote tier: redis://host:port/db, rediss://, unix:///path.sock, valkey://, "
        "redis+cluster://h1:p1,h2:p2 (or redis-cluster://), redis-sentinel://s1:p1,s2:p2/service "
        "or fs:///shared/folder. Unset: no remote tier.",
        secret=False,
    )
    integrity_key_file: str | None = option(
        None,
        optional_path,
        "File holding a secret shared by the daemons of one deployment (at least 16 bytes; "
        "mode 0600 or 0640). Set: remote values carry a keyed BLAKE3 MAC, and a value without "
        "a valid one (forged, or copied under another key) is a counted miss. The secret is "
        "read only from this file, never from the YAML or the environment.",
    )
    remote_key_prefix: str = option(
        "lmcached:", string, "Prefix of every key this daemon writes to the remote store."
    )
    remote_ttl: float = option(
        0.0,
        non_negative_seconds,
        "Expire remote entries after this many seconds; 0 keeps them until Redis evicts them.",
    )
    remote_timeout: float = option(
        1.0, seconds, "Deadline of one remote operation; a dead or hung remote costs at most this."
    )
    remote_backoff_max: float = option(
        10.0, seconds, "Longest pause between reconnect attempts to a failed remote."
    )
    write_policy: str = option(
        "write-through",
        choice("write-through", "write-back"),
        "write-through: every put is queued for disk and remote at once. write-back: a block "
        "goes down only when CPU evicts it, and at shutdown (lost on kill -9).",
    )
    write_queue_size: int = option(
        "512MiB",
        byte_size,
        "Bytes each lower tier's write queue holds per worker; when full, writes are dropped "
        "and counted (never blocked on).",
    )
    shutdown_flush_timeout: float = option(
        10.0,
        non_negative_seconds,
        "On stop (SIGTERM), how long each worker may spend writing queued blocks to disk and "
        "remote before it exits.",
    )
    # --- extensions: see lmcached/extensions and the README: "Extensions" -------------------
    external_backends: list[str] = option(
        [],
        string_list,
        "External storage backends by name (LMCache's key), each defined in extra_config by "
        "external_backend.<name>.module_path and .class_name. They join the TieredStore after "
        "the built-in tiers; earlier names are looked up first.",
    )
    storage_plugins: list[str] = option(
        [],
        string_list,
        "Deprecated: LMCache's newer spelling of external_backends (with "
        "storage_plugin.<name>.* in extra_config). Accepted; prefer external_backends.",
    )
    strict_plugins: bool = option(
        False,
        boolean,
        "Make an external plugin that fails in on_startup, or a general plugin that fails, "
        "fatal. Default: disable it, log the error and start without it.",
    )
    stat_logger_interval: float = option(
        10.0,
        seconds,
        "Seconds between the stats snapshots the scheduler hands each stat_logger plugin.",
    )
    disk_codec: str | None = option(
        None, optional_string, "Codec of blocks written to the disk tier: none, zstd, lz4 ..."
    )
    remote_codec: str | None = option(
        None, optional_string, "Codec of blocks written to the remote tier: none, zstd, lz4 ..."
    )
    remote_serde: str | None = option(
        None,
        optional_string,
        "LMCache's remote serializer: naive (no codec) or a codec name. kivi and cachegen are "
        "refused at start with the lmcached equivalent.",
    )
    # --- script plugins: run by a PluginLauncher in every process ---------
    plugin_locations: list[str] = option(
        [],
        path_list,
        "Folders (scanned at their top level) or single files holding script plugins. "
        "Alias: runtime_plugin_locations.",
    )
    plugin_stop_timeout: float = option(
        5.0, seconds, "How long a plugin's process group gets after SIGTERM before SIGKILL."
    )
    plugin_config: dict[str, Any] = option(
        {},
        plugin_config_map,
        "Per-plugin settings keyed by plugin file name: restart (never|on-failure|always), "
        "max_retries, backoff, start_seconds, enabled, rlimits {memory, cpu_seconds, "
        "open_files} and settings (free-form, passed to the plugin in LMCACHE_PLUGIN_CONFIG).",
    )
    allow_insecure_plugin_locations: bool = option(
        False,
        boolean,
        "Run plugins from folders that are world-writable or owned by another non-root user.",
    )
    plugin_log_rate_limit: int = option(
        100,
        positive_int,
        "Most output lines per second one plugin may log (bursts of 10x allowed); the rest "
        "are dropped and counted.",
    )
    # --- operations: metrics, health, authentication, quotas ---------------------
    metrics_port: int | None = option(
        9470,
        optional_port,
        "Port of the Prometheus /metrics and /healthz HTTP endpoint (null disables it). "
        "Ephemeral when `port` is 0.",
    )
    metrics_host: str = option(
        "127.0.0.1",
        bind_host,
        "Address the metrics endpoint binds; loopback only, as it has no authentication.",
    )
    health_deadline: float = option(
        2.0, seconds, "How long each worker has to answer a health probe before it counts as down."
    )
    health_interval: float = option(
        5.0,
        seconds,
        "Seconds between the scheduler's health checks (the systemd watchdog is pinged only "
        "after a passing check, at least every WatchdogSec/2).",
    )
    curve_secret_key_file: str | None = option(
        None,
        optional_path,
        "Daemon's CURVE secret certificate (from `lmcached keygen`); enables authentication on "
        "every endpoint. Required when `host` is not a loopback address.",
    )
    curve_authorized_keys: str | None = option(
        None,
        optional_path,
        "Folder of client public certificates (*.key) allowed to connect under CURVE.",
    )
    curve_client_key_file: str | None = option(
        None,
        optional_path,
        "Client side: this client's CURVE secret certificate (env LMCACHED_CURVE_CLIENT_KEY_FILE).",
    )
    curve_server_key_file: str | None = option(
        None,
        optional_path,
        "Client side: the daemon's public certificate (env LMCACHED_CURVE_SERVER_KEY_FILE).",
    )
    socket_group: str | None = option(
        None,
        optional_string,
        "Group owning ipc sockets and shared memory (mode 0660). Default: the daemon's group.",
    )
    namespace_quotas: dict[str, int] = option(
        {},
        quota_map,
        "Byte quota per key namespace (the prefix before the first '/'), split across workers "
        "like the CPU budget; a namespace's blocks are evicted only by its own puts.",
    )
    # --- passthrough ---------------------------------------------------------------------
    extra_config: dict[str, Any] = option(
        {}, mapping, "Free-form settings for extensions (LMCache's extra_config)."
    )

    # Set by load(); not a key.
    source: str | None = field(default=None, metadata={"internal": True})
    # One line per LMCache key that lmcached accepted but does not honour (not keys).
    warnings: list[str] = field(default_factory=list, metadata={"internal": True})

    # ---------------------------------------------------------------------------------------

    @property
    def effective_runtime_dir(self) -> str:
        return self.runtime_dir or default_runtime_dir()

    @property
    def effective_instance_name(self) -> str:
        if self.instance_name:
            return self.instance_name
        if self.source:
            return derived_instance_name(self.source)
        return "default"

    @property
    def instance_dir(self) -> str:
        return os.path.join(self.effective_runtime_dir, self.effective_instance_name)

    @property
    def disk_budget_per_worker(self) -> int:
        return self.max_local_disk_size // self.num_workers if self.local_disk else 0

    @property
    def cpu_budget_per_worker(self) -> int:
        return self.max_local_cpu_size // self.num_workers if self.local_cpu else 0

    @property
    def namespace_quotas_per_worker(self) -> dict[str, int]:
        """Each namespace's quota in one worker: split like the CPU budget."""
        return {ns: q // self.num_workers for ns, q in self.namespace_quotas.items()}

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Return every key with its effective value; secrets redacted unless asked not to."""
        out: dict[str, Any] = {}
        for f in _key_fields():
            value = getattr(self, f.name)
            if f.metadata["convert"] is byte_size and isinstance(value, int):
                # An int would read back as GiB; an explicit unit round-trips exactly.
                value = format_size(value)
            elif f.metadata["convert"] is quota_map:
                value = {ns: format_size(q) for ns, q in value.items()}
            out[f.name] = (
                redact_value(f.name, value, f.metadata.get("secret", False)) if redact else value
            )
        return out


# LMCache spellings accepted as aliases of our keys.
ALIASES: dict[str, str] = {
    # --- script plugins
    "runtime_plugin_locations": "plugin_locations",
}


def _key_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(Config) if not f.metadata.get("internal")]


def converter(key: str) -> Converter:
    """Return the named converter of config key ``key`` (a client reads a few keys with it)."""
    for f in _key_fields():
        if f.name == key:
            convert: Converter = f.metadata["convert"]
            return convert
    raise KeyError(key)


def key_names() -> list[str]:
    """Return every valid config key, in schema order."""
    return [f.name for f in _key_fields()]


def describe_keys() -> list[tuple[str, Any, str]]:
    """Return (key, default, doc) for every key, for docs and `config show`."""
    out = []
    for f in _key_fields():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((f.name, default, f.metadata["doc"]))
    return out


def example_yaml() -> str:
    """Render every key with its default and documentation as a commented YAML file."""
    import textwrap

    lines = [
        "# lmcached: every configuration key, with its default and what it does.",
        "# Generated by `lmcached config example`; tests check that it matches the schema.",
        "# Sizes: a number means GiB (as in LMCache); strings such as '512MiB' or '2GB' carry units.",
        "# Any key can be overridden with the environment variable LMCACHED_<KEY> (YAML syntax).",
        "",
    ]
    for name, default, doc in describe_keys():
        for line in textwrap.wrap(doc, 96):
            lines.append(f"# {line}")
        dumped = yaml.safe_dump({name: default}, default_flow_style=True, sort_keys=False).strip()
        lines.append(f"#{dumped[1:-1]}" if dumped.startswith("{") else f"# {dumped}")
        lines.append("")
    return "\n".join(lines)


_URL_SECRET = re.compile(r"(password|token|secret|key)", re.IGNORECASE)
REDACTED = "***"


def redact_url(url: str) -> str:
    """Replace the password of a URL (and secret-looking query values) with ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{hostinfo}" if ":" in userinfo else f"{REDACTED}@{hostinfo}"
        if not user and ":" in userinfo:
            netloc = f":{REDACTED}@{hostinfo}"
    query = "&".join(
        f"{k}={REDACTED}" if _URL_SECRET.search(k) else (f"{k}={v}" if v else k)
        for k, _, v in (q.partition("=") for q in parts.query.split("&") if q)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


# Remote URL schemes that list several host:port nodes: Redis Cluster seeds (ours and LMCache's
# spelling) and Redis Sentinels.
MULTI_NODE_SCHEMES = frozenset(
    {"redis+cluster", "rediss+cluster", "redis-cluster", "redis-sentinel"}
)


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """Split a multi-node URL (``redis+cluster://``, ``redis-cluster://``, ``redis-sentinel://``)
    into its nodes and client options (credentials, query options)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    opts: dict[str, Any] = {}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        if user:
            opts["username"] = unquote(user)
        if password:
            opts["password"] = unquote(password)
    nodes = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"node {item!r} in {redact_url(url)!r} is not host:port; "
                f"expected {parts.scheme}://host1:port1,host2:port2"
            )
        nodes.append((host.strip("[]"), int(port)))
    for k, v in parse_qsl(parts.query):
        opts[k] = v
    if parts.scheme.startswith("rediss"):
        opts["ssl"] = True
    return nodes, opts


def redact_value(key: str, value: Any, secret: bool = False) -> Any:
    """Return ``value`` with secrets removed: secret keys, URL passwords, secret-named entries."""
    if value is None:
        return None
    if secret or (isinstance(key, str) and _URL_SECRET.search(key) and isinstance(value, str)):
        return REDACTED
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(key, v) for v in value]
    return value


def _suggest(key: str) -> str:
    names = key_names() + list(ALIASES)
    names += list(config_lmcache.LMCACHE_KEYS) + list(config_lmcache.LMCACHE_ALIASES)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the known keys set through LMCACHED_<KEY>; other LMCACHED_* names are ignored."""
    return {key: value for key, value, _where in _env_entries(environ)}


def _env_entries(environ: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    """Return (key, value, env name) for every LMCACHED_<KEY> naming one of our keys or aliases."""
    known = {name.upper(): name for name in key_names()}
    known.update({alias.upper(): alias for alias in ALIASES})
    out = []
    for env_name, raw in environ.items():
        if not env_name.startswith(ENV_PREFIX):
            continue
        key = known.get(env_name[len(ENV_PREFIX) :])
        if key is None:
            # LMCACHED_PLUGINS, LMCACHED_CONTROL_ENDPOINT ... are not config keys.
            continue
        out.append((key, _env_value(raw), env_name))
    return out


def _env_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        return raw


def lmcache_env_entries(environ: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    """Return (LMCache key, value, env name) for every LMCACHE_<KEY> of LMCache's schema.

    As LMCache reads them: only its config keys and aliases (LMCACHE_DISABLE_BANNER, the
    LMCACHE_PLUGIN_* settings lmcached gives its script plugins ... are not keys, so they are
    ignored), and a value in matching quotes is the string inside them.
    """
    names = list(config_lmcache.LMCACHE_KEYS) + list(config_lmcache.LMCACHE_ALIASES)
    out = []
    for name in names:
        env_name = config_lmcache.ENV_PREFIX + name.upper()
        raw = environ.get(env_name)
        if raw is None:
            continue
        text = raw.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]  # LMCache unquotes, then converts by the key's type
        value = _env_value(text)
        if value is None and text.strip():
            value = text  # e.g. " # # ", which YAML reads as a comment
        out.append((name, value, env_name))
    return out


# One value as read: (key as written, raw value, where it came from: a file path or "env NAME").
_Entry = tuple[Any, Any, "str | None"]


def from_mapping(
    data: Mapping[str, Any],
    *,
    source: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build a validated Config from a mapping plus env overrides.

    Precedence, lowest first: the mapping (the file), ``LMCACHE_<KEY>`` (LMCache's names), then
    ``LMCACHED_<KEY>``. LMCache keys are translated by :mod:`lmcached.config_lmcache`; within one
    layer our own key wins over an LMCache key mapped onto it. Every problem is collected, those
    of single values and those of the cross-key checks, so one run reports them all (a single
    problem raises ConfigError, several raise ConfigErrors), each
    naming where its value came from.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            "<file>",
            f"expected a mapping of keys at the top level, got {type(data).__name__}",
            source,
        )
    env = os.environ if environ is None else environ
    layers: list[list[_Entry]] = [
        [(k, v, source) for k, v in data.items()],
        [(k, v, f"env {name}") for k, v, name in lmcache_env_entries(env)],
        [(k, v, f"env {name}") for k, v, name in _env_entries(env)],
    ]
    reader = _Reader()
    for entries in layers:
        reader.read_layer(entries)
    reader.read_lmcache_extra_config()
    values = reader.values
    # Defaults pass through their converters too, so sizes like "64MiB" become ints.
    for name, f in _fields_by_name().items():
        if name in values:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        values[name] = f.metadata["convert"](default) if default is not None else None
    cfg = Config(**values, source=source, warnings=reader.warnings)
    # The cross-key checks run even when some values were invalid, so that one run reports
    # both kinds; a check that reads an invalid key is skipped (it would judge the default).
    problems = reader.problems + cross_key_problems(cfg, skip=reader.failed, where=reader.where)
    if problems:
        raise problems[0] if len(problems) == 1 else ConfigErrors(problems)
    return cfg


# The block format's cap on one block's metadata (``meta_len``, docs/format.md): a larger meta
# could be accepted in memory but never written to disk or remote.
MAX_META_BYTES_LIMIT = 1 << 20


def _fields_by_name() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in _key_fields()}


class _Reader:
    """Convert the layers of raw values into our keys, collecting problems and warnings."""

    def __init__(self) -> None:
        self.fields = _fields_by_name()
        self.values: dict[str, Any] = {}
        self.where: dict[str, str | None] = {}
        self.problems: list[ConfigError] = []
        self.warnings: list[str] = []
        self.failed: set[str] = set()  # our keys whose value could not be converted

    def read_layer(self, entries: list[_Entry]) -> None:
        own: dict[str, str] = {}  # our key -> the spelling that set it in this layer
        mapped: dict[str, str] = {}  # our key -> the LMCache key mapped onto it in this layer
        # LMCache keys first, so that our own spelling of the same setting wins in the layer.
        ordered = sorted(entries, key=lambda e: isinstance(e[0], str) and self._is_ours(e[0]))
        for raw_key, raw_value, where in ordered:
            if not isinstance(raw_key, str):
                self.problems.append(
                    ConfigError(repr(raw_key), "config keys must be strings", where)
                )
                continue
            if self._is_ours(raw_key):
                key = ALIASES.get(raw_key, raw_key)
                if key in own and own[key] != raw_key:
                    self.problems.append(
                        ConfigError(
                            raw_key, f"is an alias of '{key}', which is also set; keep one", where
                        )
                    )
                    continue
                if key in mapped:
                    self._warn(where, mapped[key], f"overridden by '{raw_key}'")
                own[key] = raw_key
                self._set(key, raw_value, raw_key, where)
            elif config_lmcache.is_lmcache_key(raw_key):
                outcome = config_lmcache.apply(raw_key, raw_value)
                self._take(outcome, raw_key, where, mapped)
            else:
                self.problems.append(ConfigError(raw_key, f"unknown key{_suggest(raw_key)}", where))

    def read_lmcache_extra_config(self) -> None:
        """Apply LMCache's own extra_config keys (use_odirect ...); others stay free-form."""
        extra = self.values.get("extra_config") or {}
        where = self.where.get("extra_config")
        for name, value in extra.items():
            outcome = config_lmcache.apply_extra(name, value)
            if outcome is None:
                continue
            # An explicitly set key of ours wins over its extra_config spelling.
            updates = {k: v for k, v in outcome.updates.items() if k not in self.values}
            self._take(
                dataclasses.replace(outcome, updates=updates), f"extra_config.{name}", where, {}
            )

    def _is_ours(self, raw_key: str) -> bool:
        return ALIASES.get(raw_key, raw_key) in self.fields

    def _take(
        self,
        outcome: config_lmcache.Outcome,
        raw_key: str,
        where: str | None,
        mapped: dict[str, str],
    ) -> None:
        if outcome.error:
            self.problems.append(ConfigError(raw_key, outcome.error, where))
        if outcome.warning:
            self._warn(where, raw_key, outcome.warning)
        for key, value in outcome.updates.items():
            mapped[key] = raw_key
            self._set(key, value, raw_key, where)

    def _set(self, key: str, raw_value: Any, raw_key: str, where: str | None) -> None:
        try:
            self.values[key] = self.fields[key].metadata["convert"](raw_value)
            self.where[key] = where
        except ValueError as exc:
            self.failed.add(key)
            self.values.pop(key, None)  # a lower layer's value is not what was asked for
            self.problems.append(ConfigError(raw_key, str(exc), where))

    def _warn(self, where: str | None, key: str, message: str) -> None:
        self.warnings.append(f"{where or 'config'}: {key}: {message}")


def validate(cfg: Config) -> None:
    """Check rules that span several keys; raise every problem found (ConfigError, or
    ConfigErrors for several), each with an actionable sentence.

    Only the values themselves are checked here. Whether the names they mention exist (an
    eviction policy, a codec, a plugin class) is asked of the extension registry by
    :func:`lmcached.daemon.assembly.check_store_config`, which ``lmcached config check`` and
    every worker run; whether the plugin folders are safe, by
    :func:`lmcached.supervision.discovery.check_plugin_locations` where script plugins start.
    """
    problems = cross_key_problems(cfg)
    if problems:
        raise problems[0] if len(problems) == 1 else ConfigErrors(problems)


def cross_key_problems(
    cfg: Config,
    skip: set[str] | frozenset[str] = frozenset(),
    where: Mapping[str, str | None] | None = None,
) -> list[ConfigError]:
    """Return the problems of every cross-key check that reads none of the keys in ``skip``.

    ``skip`` holds keys whose own value was invalid (the Config carries their default instead):
    a check that reads one would judge a value nobody wrote. ``where`` maps a key to where its
    value was set (a file path, or "env NAME"), to name that in each problem.
    """
    problems: list[ConfigError] = []
    for keys, check in _CROSS_KEY_CHECKS:
        if skip.isdisjoint(keys):
            problems.extend(_named_by_origin(p, keys, where or {}) for p in check(cfg))
    return problems


def _named_by_origin(
    problem: ConfigError, keys: frozenset[str], where: Mapping[str, str | None]
) -> ConfigError:
    """Name where the values behind ``problem`` were set (an env variable, say), not the file.

    That is where its own key was set, else the one place that set the check's other keys.
    """
    origin = where.get(problem.key)
    if problem.key not in where:
        places = {where[k] for k in keys if k in where}
        origin = places.pop() if len(places) == 1 else None
    if origin is None or origin == problem.source:
        return problem
    return ConfigError(problem.key, problem.message, origin)


def _check_request_sizes(cfg: Config) -> Iterator[ConfigError]:
    src = cfg.source
    if cfg.max_block_size > cfg.max_inflight_bytes:
        yield ConfigError(
            "max_block_size",
            f"{cfg.max_block_size} bytes exceeds max_inflight_bytes ({cfg.max_inflight_bytes}); "
            "a single block must fit in one request",
            src,
        )
    if cfg.wire_frame_size < 4096:
        yield ConfigError("wire_frame_size", "must be at least 4KiB", src)
    if cfg.max_meta_bytes > MAX_META_BYTES_LIMIT:
        yield ConfigError(
            "max_meta_bytes",
            f"{cfg.max_meta_bytes} bytes exceeds {MAX_META_BYTES_LIMIT}, the most a stored "
            "block's header holds (docs/format.md)",
            src,
        )


def _check_ports(cfg: Config) -> Iterator[ConfigError]:
    if cfg.port != 0 and cfg.port + cfg.num_workers > 65535:
        yield ConfigError(
            "port", f"port {cfg.port} + {cfg.num_workers} workers exceeds 65535", cfg.source
        )


def _check_disk_tier(cfg: Config) -> Iterator[ConfigError]:
    src = cfg.source
    if cfg.local_disk and cfg.max_local_disk_size <= 0:
        yield ConfigError(
            "max_local_disk_size",
            f"local_disk is set ({cfg.local_disk}) but the disk budget is 0; "
            "set max_local_disk_size, e.g. 20 (GiB)",
            src,
        )
    if cfg.max_local_disk_size > 0 and not cfg.local_disk:
        yield ConfigError(
            "local_disk", "max_local_disk_size is set but local_disk is not; name a folder", src
        )


def _check_remote_url(cfg: Config) -> Iterator[ConfigError]:
    # Only the URL's own shape; whether a connector serves the scheme is the registry's
    # question (check_store_config).
    src = cfg.source
    if not cfg.remote_url:
        return
    parts = urlsplit(cfg.remote_url)
    scheme = parts.scheme.lower()
    if scheme in MULTI_NODE_SCHEMES:
        try:
            parse_cluster_url(cfg.remote_url)
        except ValueError as exc:
            yield ConfigError("remote_url", str(exc), src)
    if scheme == "fs" and parts.netloc:
        # LMCache's documented form is fs://host:port/path; its host and port mean nothing
        # to a folder.
        cfg.warnings.append(
            f"{src or 'config'}: remote_url: the host and port of fs://{parts.netloc} are "
            f"ignored; fs:// names a folder on this machine ({unquote(parts.path) or '/'})"
        )


def load(
    path: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Load and validate a config file (None: defaults plus env overrides).

    Without a path, LMCache's ``LMCACHE_CONFIG_FILE`` names the file, as it does for LMCache (a
    path given here, by ``--config`` or ``LMCACHED_CONFIG``, comes first).
    """
    if path is None:
        path = (os.environ if environ is None else environ).get(config_lmcache.CONFIG_FILE_ENV)
        if not path:
            return from_mapping({}, environ=environ)
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"not valid YAML: {exc}".replace("\n", " "), str(p)) from None
    return from_mapping(data or {}, source=str(p.absolute()), environ=environ)


def memory_warning(cfg: Config) -> str | None:
    """Return a warning when the CPU budget exceeds the memory available, else None."""
    if not cfg.local_cpu:
        return None
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:
        return None
    if cfg.max_local_cpu_size > available:
        return (
            f"max_local_cpu_size ({cfg.max_local_cpu_size / GIB:.1f} GiB) exceeds the memory "
            f"available now ({available / GIB:.1f} GiB); the daemon may be OOM-killed"
        )
    return None


# --- operations: cross-field checks -----------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """Return True for 127.0.0.0/8, ::1 and 'localhost'; every other name counts as exposed."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_authentication(cfg: Config) -> Iterator[ConfigError]:
    if cfg.metrics_port is not None and not is_loopback_host(cfg.metrics_host):
        yield ConfigError(
            "metrics_host",
            f"binding {cfg.metrics_host} exposes the unauthenticated metrics endpoint beyond this "
            "machine; keep it on a loopback address and let a local agent or proxy export it",
            cfg.source,
        )
    if not is_loopback_host(cfg.host) and not cfg.curve_secret_key_file:
        yield ConfigError(
            "host",
            f"binding {cfg.host} exposes the cache beyond this machine; set "
            "curve_secret_key_file and curve_authorized_keys (create keys with `lmcached keygen`)",
            cfg.source,
        )
    if cfg.curve_secret_key_file and not cfg.curve_authorized_keys:
        yield ConfigError(
            "curve_authorized_keys",
            "is required with curve_secret_key_file: without an allow-list of client public "
            "keys any CURVE client could connect",
            cfg.source,
        )
    if not cfg.enable_tcp and not is_loopback_host(cfg.host):
        # Before enable_tcp existed, such a host meant TCP; never drop off-host clients silently.
        yield ConfigError(
            "enable_tcp",
            f"host is {cfg.host}, for off-host clients, but TCP is off; set enable_tcp: true "
            "(it runs CURVE with your keys) or remove host",
            cfg.source,
        )
    for key in ("curve_secret_key_file", "curve_authorized_keys"):
        path = getattr(cfg, key)
        if path and not os.path.exists(path):
            yield ConfigError(key, f"{path} does not exist", cfg.source)


def _check_namespace_quotas(cfg: Config) -> Iterator[ConfigError]:
    total = sum(cfg.namespace_quotas.values())
    if cfg.namespace_quotas and not cfg.local_cpu:
        yield ConfigError("namespace_quotas", "needs the CPU tier (local_cpu: true)", cfg.source)
    if total > cfg.max_local_cpu_size:
        yield ConfigError(
            "namespace_quotas",
            f"the quotas add up to {total} bytes, more than max_local_cpu_size "
            f"({cfg.max_local_cpu_size}); a quota is a reservation, so they must fit",
            cfg.source,
        )


# Every cross-key check, with the keys it reads (a check is skipped when one of them is invalid).
_CROSS_KEY_CHECKS: tuple[tuple[frozenset[str], Callable[[Config], Iterator[ConfigError]]], ...] = (
    (
        frozenset({"max_block_size", "max_inflight_bytes", "wire_frame_size", "max_meta_bytes"}),
        _check_request_sizes,
    ),
    (frozenset({"port", "num_workers"}), _check_ports),
    (frozenset({"local_disk", "max_local_disk_size"}), _check_disk_tier),
    (frozenset({"remote_url"}), _check_remote_url),
    (
        frozenset(
            {
                "metrics_port",
                "metrics_host",
                "host",
                "enable_tcp",
                "curve_secret_key_file",
                "curve_authorized_keys",
            }
        ),
        _check_authentication,
    ),
    (frozenset({"namespace_quotas", "local_cpu", "max_local_cpu_size"}), _check_namespace_quotas),
)


def wire_limits(cfg: Config) -> Limits:
    """Return what a worker accepts on the wire; the map publishes it to clients."""
    return Limits(
        max_block_size=cfg.max_block_size,
        max_keys_per_batch=cfg.max_keys_per_batch,
        max_key_length=cfg.max_key_length,
        max_request_bytes=cfg.max_inflight_bytes,
        wire_frame_size=cfg.wire_frame_size,
        max_meta_bytes=cfg.max_meta_bytes,
    )


def needs_checksums(cfg: Config) -> bool:
    """Return True when blocks leave process memory, so clients must send payload checksums."""
    return bool(cfg.local_disk or cfg.remote_url)
