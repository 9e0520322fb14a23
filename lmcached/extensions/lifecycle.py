"""The plugin lifecycle (KV-OptKit's): typed config, start-up, shut-down, metrics.

An external storage backend or remote connector may derive from :class:`PluginBase` to get::

    validate_config(dict) -> typed config   # a dataclass; errors name the field
    on_startup()                            # open files, connect; raising disables the plugin
    on_shutdown()                           # release what on_startup took
    get_metrics() -> dict                   # shown under the plugin's name in stats/status

Classes that do not derive from it (an LMCache backend, say) still load: they get no typed
config and no hooks. :mod:`lmcached.extensions.guard` wraps every external backend and connector
so that an exception at run time is counted and answered, never a failed request.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from lmcached.errors import LMCachedError


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
