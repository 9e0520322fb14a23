"""The plugin lifecycle (KV-OptKit's): typed config, start-up, shut-down, metrics.

An external storage backend or remote connector may derive from :class:`PluginBase` to get::

    validate_config(dict) -> typed config   # a dataclass; errors name the field
    on_startup()                            # open files, connect; raising disables the plugin
    on_shutdown()                           # release what on_startup took
    get_metrics() -> dict                   # shown under the plugin's name in stats/status

Classes that do not derive from it (an LMCache backend, say) still load: they get no typed
config and no hooks. :class:`GuardedBackend` wraps every external backend in the TieredStore so
that an exception at run time is counted and answered as a miss, never as a failed request.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from lmcached.errors import LMCachedError
from lmcached.storage.base import Block, StorageBackend, Usage

log = structlog.get_logger("lmcached.plugins")


class PluginType(str, enum.Enum):
    """KV-OptKit's plugin types, shown by ``lmcached plugins``."""

    KV_CACHE = "KV_CACHE"
    QUANTIZATION = "QUANTIZATION"
    OTHER = "OTHER"


class PluginConfigError(LMCachedError):
    """A plugin option is unknown, missing or of the wrong type; ``field`` names it."""

    def __init__(self, plugin: str, field: str, message: str) -> None:
        self.plugin = plugin
        self.field = field
        self.message = message
        super().__init__(f"{plugin}: {field}: {message}")


class PluginStartupError(LMCachedError):
    """A plugin raised in ``on_startup`` while ``strict_plugins`` is true."""


@dataclass
class PluginConfig:
    """Base of plugin configs: a dataclass whose fields are the plugin's options."""


@dataclass(frozen=True)
class PluginContext:
    """Where a plugin instance runs: its name and the worker that owns it."""

    name: str = "plugin"
    category: str = "storage_backend"
    worker_id: int = 0
    num_workers: int = 1
    config_source: str | None = None


def typed_config(config_class: type[Any], options: Mapping[str, Any], plugin: str) -> Any:
    """Build ``config_class`` (a dataclass) from ``options``, checking names and types.

    Raises :class:`PluginConfigError` naming the first bad field: an unknown option (with the
    known ones), a missing required one, or a value of the wrong type.
    """
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"{plugin}: config_class {config_class!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    hints = typing.get_type_hints(config_class)
    for key in options:
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise PluginConfigError(plugin, str(key), f"unknown option; known options: {known}")
    values = {}
    for name, f in fields.items():
        if name not in options:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PluginConfigError(plugin, name, "is required")
            continue
        values[name] = _convert(options[name], hints.get(name, Any), plugin, name)
    return config_class(**values)


def _convert(value: Any, hint: Any, plugin: str, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, plugin, name)
            except PluginConfigError as exc:
                problems.append(exc.message)
        raise PluginConfigError(plugin, name, " or ".join(problems))
    if origin is typing.Literal:
        if value in args:
            return value
        raise PluginConfigError(plugin, name, f"expected one of {list(args)}, got {value!r}")
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise PluginConfigError(plugin, name, f"expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_convert(v, item, plugin, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise PluginConfigError(plugin, name, f"expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = [m.value for m in hint]
            raise PluginConfigError(
                plugin, name, f"expected one of {allowed}, got {value!r}"
            ) from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PluginConfigError(plugin, name, f"expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise PluginConfigError(plugin, name, f"expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise PluginConfigError(plugin, name, f"expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise PluginConfigError(plugin, name, f"expected a string, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise PluginConfigError(plugin, name, f"expected {hint.__name__}, got {value!r}")
    return value


class PluginBase:
    """Base class of lifecycle-aware plugins; built as ``cls(options, context)``."""

    plugin_type: ClassVar[PluginType] = PluginType.OTHER
    config_class: ClassVar[type[Any]] = PluginConfig

    def __init__(
        self, options: Mapping[str, Any] | None = None, context: PluginContext | None = None
    ) -> None:
        self.context = context or PluginContext(name=type(self).__name__)
        self.config = self.validate_config(dict(options or {}))

    def validate_config(self, config: dict[str, Any]) -> Any:
        """Return the typed config for ``config``; raise PluginConfigError naming the field."""
        return typed_config(self.config_class, config, self.context.name)

    def on_startup(self) -> None:
        """Acquire resources; an exception here disables the plugin (or aborts, if strict)."""
        return None

    def on_shutdown(self) -> None:
        """Release what on_startup acquired; called once, also after a failed on_startup."""
        return None

    def get_metrics(self) -> dict[str, Any]:
        """Return numbers worth showing under the plugin's name in stats and status."""
        return {}


class OpErrors:
    """Count a plugin's failures per operation (thread-safe), for logs and stats."""

    def __init__(self) -> None:
        self._by_op: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, op: str) -> int:
        """Record one failure of ``op``; return how many there have been (1 = the first)."""
        with self._lock:
            n = self._by_op.get(op, 0) + 1
            self._by_op[op] = n
            return n

    def __getitem__(self, op: str) -> int:
        with self._lock:
            return self._by_op.get(op, 0)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._by_op.values())


class GuardedBackend(StorageBackend):
    """Run an external backend so that its failures are misses, counted, never request errors.

    Each failing call is logged (the first one per operation in full, later ones only counted)
    and answered as the tier's "not here" value: None, False or nothing.
    """

    def __init__(self, name: str, inner: StorageBackend, entry_class: str = "") -> None:
        self.name = name
        self.inner = inner
        self.entry_class = entry_class
        self.errors = OpErrors()
        self._closed = False

    def _failed(self, op: str, exc: BaseException) -> None:
        if self.errors.count(op) == 1:
            log.error(
                "plugin backend raised; answering as a miss",
                plugin=self.name,
                op=op,
                error=f"{type(exc).__name__}: {exc}",
            )

    def contains(self, key: bytes) -> bool:
        try:
            return bool(self.inner.contains(key))
        except Exception as exc:
            self._failed("contains", exc)
            return False

    def get(self, key: bytes) -> Block | None:
        try:
            block = self.inner.get(key)
        except Exception as exc:
            self._failed("get", exc)
            return None
        if block is not None and not isinstance(block, Block):
            self._failed("get", TypeError(f"returned {type(block).__name__}, not a Block"))
            return None
        return block

    def put(self, key: bytes, block: Block) -> bool:
        try:
            return bool(self.inner.put(key, block))
        except Exception as exc:
            self._failed("put", exc)
            return False

    def remove(self, key: bytes) -> bool:
        try:
            return bool(self.inner.remove(key))
        except Exception as exc:
            self._failed("remove", exc)
            return False

    def iter_keys(self) -> Iterator[bytes]:
        try:
            return iter(list(self.inner.iter_keys()))
        except Exception as exc:
            self._failed("iter_keys", exc)
            return iter(())

    def usage(self) -> Usage:
        try:
            return self.inner.usage()
        except Exception as exc:
            self._failed("usage", exc)
            return Usage(used_bytes=0, capacity_bytes=0, entries=0)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        try:
            return [bool(x) for x in self.inner.contains_many(keys)]
        except Exception as exc:
            self._failed("contains", exc)
            return [False] * len(keys)

    def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, Block]]) -> list[bool]:
        return [self.put(k, b) for k, b in items]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            out.update(self.inner.stats())
        except Exception as exc:
            self._failed("stats", exc)
        if isinstance(self.inner, PluginBase):
            try:
                out["plugin"] = dict(self.inner.get_metrics())
            except Exception as exc:
                self._failed("get_metrics", exc)
        # Counted last, so a failure of the two calls above is included.
        out["plugin_errors"] = self.errors.total
        # Also in the generic tier counter, so the metrics endpoint's lmcached_tier_errors
        # counts them under the plugin's name without knowing about plugins.
        out["errors"] = int(out.get("errors", 0) or 0) + out["plugin_errors"]
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if isinstance(self.inner, PluginBase):
            try:
                self.inner.on_shutdown()
            except Exception as exc:
                self._failed("on_shutdown", exc)
        try:
            self.inner.close()
        except Exception as exc:
            self._failed("close", exc)
