"""Start one in-process extension and remember how it is doing.

:func:`start_plugin` builds a plugin object and runs its ``on_startup``; a plugin that raises
there is disabled and the daemon starts without it, unless ``strict_plugins`` is set.
:func:`extension_states` is what ``stats()`` reports under ``extensions`` (and ``/metrics``
exports). Which plugins a worker builds, and in what order, is decided by
:mod:`lmcached.daemon.assembly`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from lmcached.extensions.lifecycle import PluginBase, PluginStartupError

log = structlog.get_logger("lmcached.plugins")


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


def start_plugin(
    cls: type,
    build: Callable[[], Any],
    name: str,
    category: str,
    *,
    strict: bool,
) -> Any | None:
    """Build one plugin with ``build()`` and start it; return it, or None when it is disabled.

    A failure in ``build()`` or ``on_startup`` runs ``on_shutdown`` (to release what a half
    start took), then raises :class:`PluginStartupError` when ``strict``, else records the
    plugin as disabled with its error.
    """
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
                f"{category} {name!r} ({class_path}) failed to start: {error} "
                "(strict_plugins is true)"
            ) from exc
        log.error(
            "plugin failed to start; disabled, the daemon starts without it",
            plugin=name,
            category=category,
            error=error,
            hint="set strict_plugins: true to make this fatal",
        )
        _record(ExtensionState(name, category, class_path, "disabled", error))
        return None
    _record(ExtensionState(name, category, class_path, "running", instance=instance))
    return instance


def shutdown_plugins() -> None:
    """Mark every running plugin stopped (their on_shutdown runs from the tier's close())."""
    with _STATES_LOCK:
        for state in _STATES.values():
            if state.state == "running":
                state.state = "stopped"
