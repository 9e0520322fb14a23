"""What the daemon does with its plugins at start: check every used entry, build, report.

- :func:`check_config` runs inside config validation (``lmcached start``, ``config check``, each
  worker's load): it loads entry points, registers the config's LMCache-style declarations, then
  imports and interface-checks every entry the config uses (eviction policy, codecs, external
  backends, the connector of ``remote_url``'s scheme) and validates their typed options. A
  broken plugin therefore stops the start with one line naming it.
- :func:`build_external_backends` and :func:`build_remote_connector` are called by
  ``lmcached.daemon.assembly.build_store`` in each worker. They run ``on_startup``; a plugin that
  raises there is disabled and the daemon starts without it, unless ``strict_plugins`` is set.
- :func:`tier_codec` names the codec of a tier (``disk_codec``, ``remote_codec``,
  ``remote_serde``).
- :func:`extension_states` is what ``stats()`` reports under ``extensions``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from lmcached.errors import ConfigError
from lmcached.extensions import sources
from lmcached.extensions.lifecycle import (
    PluginBase,
    PluginConfigError,
    PluginContext,
    PluginStartupError,
    typed_config,
)
from lmcached.extensions.registry import PluginError, PluginRegistry, get_registry

if TYPE_CHECKING:  # pragma: no cover
    from lmcached.config import Config
    from lmcached.extensions.interfaces import RemoteConnector
    from lmcached.storage.base import StorageBackend

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


def check_config(cfg: Config, registry: PluginRegistry | None = None) -> None:
    """Import and check every registry entry ``cfg`` uses; raise ConfigError naming it."""
    registry = registry or get_registry()
    report = sources.load(registry)
    for name, error in report.failed.items():
        log.warning("plugin package failed to load", plugin=name, error=error)
    plugins = sources.parse_config_plugins(cfg)
    sources.register_config_plugins(plugins, registry)
    for note in plugins.notes:
        log.warning("deprecated config spelling", note=note, source=cfg.source)
    src = cfg.source
    _require(registry, "eviction_policy", cfg.eviction_policy, "eviction_policy", src)
    for tier in ("disk", "remote"):
        name = tier_codec(cfg, tier)
        if name is not None:
            key = f"{tier}_codec" if getattr(cfg, f"{tier}_codec") else "remote_serde"
            _require_codec(registry, name, key, src)
    for spec in plugins.backends:
        key = f"external_backends ({spec.name})"
        cls = _require(registry, "storage_backend", spec.name, key, src)
        _check_options(cls, spec, src)
    remote_url = getattr(cfg, "remote_url", None)
    if remote_url:
        # Built-in and external schemes alike: the registry's winner for the scheme serves it.
        scheme = urlsplit(remote_url).scheme.lower()
        if not registry.has("remote_connector", scheme):
            raise ConfigError(
                "remote_url",
                f"no connector for scheme {scheme!r}; registered: "
                f"{', '.join(registry.names('remote_connector'))} (or set extra_config "
                f"external_connector.{scheme}.module_path/class_name)",
                src,
            )
        _require(registry, "remote_connector", scheme, "remote_url", src)
    for scheme, spec in plugins.connectors.items():
        # Declared but unused connectors are still imported: a typo must not hide until the
        # day remote_url changes.
        cls = _require(registry, "remote_connector", scheme, f"extra_config.{spec.key_prefix}", src)
        _check_options(cls, spec, src)


def _require(registry: PluginRegistry, category: str, name: str, key: str, src: str | None) -> type:
    try:
        return registry.get_class(category, name)
    except PluginError as exc:
        raise ConfigError(key, str(exc), src) from None


def _require_codec(registry: PluginRegistry, name: str, key: str, src: str | None) -> None:
    from lmcached.codecs.base import CodecError, make_codec

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


def tier_codec(cfg: Config, tier: str) -> str | None:
    """Return the codec name of ``tier`` ('disk' or 'remote'), or None for no codec.

    ``remote_codec`` wins over LMCache's ``remote_serde``; setting both to different codecs is
    refused. ``remote_serde: naive`` means no codec; ``kivi`` and ``cachegen`` are refused with
    the lmcached equivalent.
    """
    if tier == "disk":
        return _codec_name(cfg.disk_codec)
    if tier != "remote":
        raise ValueError(f"tiers with codecs are 'disk' and 'remote', not {tier!r}")
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


# ------------------------------------------------------------------------------------------
# Building (in each worker)
# ------------------------------------------------------------------------------------------


@dataclass
class ExtensionState:
    """How one external plugin is doing in this process."""

    name: str
    category: str
    class_path: str
    state: str  # running | disabled | stopped
    error: str | None = None
    instance: Any = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "category": self.category,
            "class": self.class_path,
            "state": self.state,
        }
        if self.error:
            out["error"] = self.error
        if isinstance(self.instance, PluginBase) and self.state == "running":
            try:
                out["metrics"] = dict(self.instance.get_metrics())
            except Exception as exc:
                out["metrics_error"] = f"{type(exc).__name__}: {exc}"
        return out


_STATES: dict[str, ExtensionState] = {}
_STATES_LOCK = threading.Lock()


def extension_states() -> dict[str, dict[str, Any]]:
    """Return every external plugin of this process by name: state, error, metrics."""
    with _STATES_LOCK:
        states = list(_STATES.values())
    return {s.name: s.as_dict() for s in states}


def _record(state: ExtensionState) -> None:
    with _STATES_LOCK:
        _STATES[state.name] = state


def _start(
    cls: type,
    build: Any,
    spec: sources.ExternalSpec,
    strict: bool,
    category: str,
) -> Any | None:
    """Build and start one plugin; return it, or None when it is disabled."""
    class_path = f"{cls.__module__}:{cls.__qualname__}"
    instance = None
    try:
        instance = build()
        if isinstance(instance, PluginBase):
            instance.on_startup()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(instance, PluginBase):
            try:
                instance.on_shutdown()
            except Exception as shutdown_exc:  # already failing; keep the first error
                log.warning("plugin on_shutdown raised after failed start", error=str(shutdown_exc))
        if strict:
            raise PluginStartupError(
                f"{category} {spec.name!r} ({class_path}) failed to start: {error} "
                "(strict_plugins is true)"
            ) from exc
        log.error(
            "plugin failed to start; disabled, the daemon starts without it",
            plugin=spec.name,
            category=category,
            error=error,
            hint="set strict_plugins: true to make this fatal",
        )
        _record(ExtensionState(spec.name, category, class_path, "disabled", error))
        return None
    _record(ExtensionState(spec.name, category, class_path, "running", instance=instance))
    return instance


def build_external_backends(
    cfg: Config,
    worker_id: int = 0,
    registry: PluginRegistry | None = None,
) -> list[StorageBackend]:
    """Build the config's external backends in listed order, each guarded; skip failed ones."""
    registry = registry or get_registry()
    plugins = sources.parse_config_plugins(cfg)
    sources.register_config_plugins(plugins, registry)
    out: list[StorageBackend] = []
    for spec in plugins.backends:
        cls = registry.get_class("storage_backend", spec.name)
        ctx = _context(cfg, spec.name, "storage_backend", worker_id)
        options = dict(spec.options)
        instance = _start(
            cls,
            lambda cls=cls, options=options, ctx=ctx: cls(options, ctx),
            spec,
            cfg.strict_plugins,
            "storage_backend",
        )
        if instance is not None:
            entry = registry.get_entry("storage_backend", spec.name)
            from lmcached.extensions.guard import GuardedBackend

            out.append(GuardedBackend(spec.name, instance, entry.class_path))
    return out


def build_remote_connector(
    cfg: Config,
    worker_id: int = 0,
    registry: PluginRegistry | None = None,
    *,
    remote_url: str | None = None,
) -> RemoteConnector | None:
    """Build the connector for ``remote_url``'s scheme, as the registry resolves it.

    ``lmcached.daemon.assembly.build_tiers`` puts the result behind the tiers' RemoteBackend,
    whichever package the class comes from. A class deriving from
    :class:`~lmcached.extensions.lifecycle.PluginBase` is built as
    ``cls(url, timeout=..., options=..., context=...)`` and started (``on_startup``); any other
    as ``cls(url, timeout=...)``. A connector from outside lmcached (the winning entry is not a
    built-in) is wrapped in :class:`~lmcached.extensions.guard.GuardedConnector`, so
    whatever it raises marks the remote down instead of failing requests.

    Returns None when there is no ``remote_url``, or when the connector failed in
    ``on_startup`` and ``strict_plugins`` is false (the daemon then runs without its remote
    tier). ``remote_url`` overrides the config's. An unregistered scheme raises ConfigError.
    """
    from lmcached.extensions.guard import GuardedConnector

    remote_url = remote_url or getattr(cfg, "remote_url", None)
    if not remote_url:
        return None
    timeout = float(getattr(cfg, "remote_timeout", None) or cfg.request_timeout)
    registry = registry or get_registry()
    sources.load(registry)
    plugins = sources.parse_config_plugins(cfg)
    sources.register_config_plugins(plugins, registry)
    scheme = urlsplit(remote_url).scheme.lower()
    cls = _require(registry, "remote_connector", scheme, "remote_url", cfg.source)
    entry = registry.get_entry("remote_connector", scheme)
    if entry.builtin and not issubclass(cls, PluginBase):
        connector: RemoteConnector = cls(remote_url, timeout=timeout)
        return connector
    spec = plugins.connectors.get(scheme) or sources.ExternalSpec(
        "external_connector", scheme, cls.__module__, cls.__qualname__, {}, scheme
    )
    if issubclass(cls, PluginBase):
        ctx = _context(cfg, scheme, "remote_connector", worker_id)
        options: Mapping[str, Any] = dict(spec.options)

        def build() -> Any:
            return cls(remote_url, timeout=timeout, options=options, context=ctx)
    else:

        def build() -> Any:
            return cls(remote_url, timeout=timeout)

    instance = _start(cls, build, spec, cfg.strict_plugins, "remote_connector")
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


def shutdown_plugins() -> None:
    """Mark every running plugin stopped (their on_shutdown runs from the tier's close())."""
    with _STATES_LOCK:
        for state in _STATES.values():
            if state.state == "running":
                state.state = "stopped"
