"""Run the ``general`` plugins once in this daemon process, in the manner of vLLM's.

A general plugin is a callable found through the entry-point group ``lmcached.general_plugins``
(or registered at run time). Every daemon process runs each one once at start, before it binds
or builds anything: the scheduler, and each worker (so a plugin may register a codec or policy
that the worker's store then uses). A plugin is called with no argument, as vLLM does, or with
a :class:`ProcessInfo` when it takes one required positional parameter.

A plugin that cannot be imported or raises is reported on one log line naming it and recorded
(``general_plugins`` in the worker's stats and in ``lmcached status``); the process goes on
without it. With ``strict_plugins: true`` it is fatal, as a failing ``on_startup`` is: the
process exits with code 78 and the daemon stops.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import structlog

from lmcached.extensions import sources
from lmcached.extensions.lifecycle import PluginStartupError
from lmcached.extensions.registry import PluginError, PluginRegistry, get_registry

__all__ = ["GeneralPluginRun", "ProcessInfo", "general_plugin_states", "run_general_plugins"]

log = structlog.get_logger("lmcached.plugins")


@dataclass(frozen=True)
class ProcessInfo:
    """Which daemon process a general plugin runs in."""

    role: str  # "scheduler" or "worker"
    worker_id: int | None = None
    config_source: str | None = None

    @property
    def pid(self) -> int:
        return os.getpid()


@dataclass(frozen=True)
class GeneralPluginRun:
    """How one general plugin's run went in this process."""

    name: str
    class_path: str
    package: str
    ok: bool
    seconds: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "class": self.class_path,
            "package": self.package,
            "state": "ok" if self.ok else "failed",
            "seconds": round(self.seconds, 6),
        }
        if self.error is not None:
            out["error"] = self.error
        return out


_LOCK = threading.Lock()
# registry -> (pid, runs by name). A forked child (another pid) runs its own; a registry replaced
# by reset_registry() (tests) takes its runs along, so the fresh one runs its plugins again.
_RAN: weakref.WeakKeyDictionary[PluginRegistry, tuple[int, dict[str, GeneralPluginRun]]] = (
    weakref.WeakKeyDictionary()
)


def run_general_plugins(
    process: ProcessInfo, *, strict: bool, registry: PluginRegistry | None = None
) -> list[GeneralPluginRun]:
    """Run every ``general`` entry once in this process; return how each went.

    A second call in the same process returns the first call's results without running
    anything. Raises :class:`PluginStartupError` on the first failure when ``strict``.
    """
    registry = registry or get_registry()
    with _LOCK:
        done = _RAN.get(registry)
        if done is not None and done[0] == os.getpid():
            return list(done[1].values())
        by_name: dict[str, GeneralPluginRun] = {}
        _RAN[registry] = (os.getpid(), by_name)
    sources.load(registry)
    runs = []
    for entry in registry.iter_entries("general"):
        start = time.perf_counter()
        error = None
        try:
            fn: Any = registry.get_callable("general", entry.name)
            if _takes_an_argument(fn):
                fn(process)
            else:
                fn()
        except PluginError as exc:
            error = str(exc).split(": ", 1)[1]
        except Exception as exc:  # a plugin's own failure, whatever it is
            error = f"{type(exc).__name__}: {exc}"
        run = GeneralPluginRun(
            entry.name,
            entry.class_path,
            entry.package,
            error is None,
            time.perf_counter() - start,
            error,
        )
        runs.append(run)
        with _LOCK:
            by_name[entry.name] = run
        if error is None:
            log.info("general plugin ran", plugin=entry.name, role=process.role)
            continue
        if strict:
            raise PluginStartupError(
                f"general plugin {entry.name!r} ({entry.class_path}) failed in the "
                f"{process.role}: {error} (strict_plugins is true)"
            )
        log.error(
            "general plugin failed; the process goes on without it",
            plugin=entry.name,
            role=process.role,
            error=error,
            hint="set strict_plugins: true to make this fatal",
        )
    return runs


def general_plugin_states(registry: PluginRegistry | None = None) -> dict[str, dict[str, Any]]:
    """Return how each general plugin ran in this process, by name (for stats and status)."""
    registry = registry or get_registry()
    with _LOCK:
        done = _RAN.get(registry)
        if done is None or done[0] != os.getpid():
            return {}
        return {name: run.as_dict() for name, run in done[1].items()}


def _takes_an_argument(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it as vLLM does
        return False
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) == 1
