"""Feed the scheduler's stats snapshot to the ``stat_logger`` plugins, each on its own thread.

:class:`StatLoggers` builds every registered stat logger at start (``cls(options, context)``
and ``on_startup``, see :mod:`lmcached.extensions.stat_logger`), then every
``stat_logger_interval`` seconds asks the workers for their stats through the scheduler's loop
(``request_worker_stats``, the same probe ``status`` uses) and hands the resulting status
document to each logger. The loop thread never runs plugin code: it only drops the snapshot
into each logger's one-slot mailbox. Each logger's thread calls ``record``; an exception is
counted (``errors``), logged in full the first time, and the next snapshot still comes. A
logger still busy when the next snapshot arrives gets the newer one (the older is counted as
``dropped``), so a slow logger neither delays the others nor piles up memory.

A logger that fails to build or start is disabled and reported, unless ``strict_plugins`` is
true: then :class:`~lmcached.extensions.lifecycle.PluginStartupError` stops the start.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Mapping
from typing import Any

import structlog

from lmcached import config as config_mod
from lmcached.extensions import sources
from lmcached.extensions.lifecycle import PluginContext, PluginStartupError
from lmcached.extensions.registry import PluginRegistry, get_registry

log = structlog.get_logger("lmcached.plugins")

OPTION_PREFIX = "stat_logger."


def logger_options(cfg: config_mod.Config, name: str) -> dict[str, Any]:
    """Return the ``extra_config`` options of one stat logger: ``stat_logger.<name>.<option>``."""
    prefix = f"{OPTION_PREFIX}{name}."
    return {k[len(prefix) :]: v for k, v in cfg.extra_config.items() if k.startswith(prefix)}


def _option_owners(cfg: config_mod.Config) -> set[str]:
    """Return the logger names that ``extra_config`` gives options to."""
    return {
        k[len(OPTION_PREFIX) :].split(".", 1)[0]
        for k in cfg.extra_config
        if k.startswith(OPTION_PREFIX) and "." in k[len(OPTION_PREFIX) :]
    }


class LoggerSlot:
    """One stat logger, its thread, its mailbox and its counters."""

    def __init__(self, name: str, class_path: str, instance: Any, stop_timeout: float) -> None:
        self.name = name
        self.class_path = class_path
        self.instance = instance
        self.stop_timeout = stop_timeout
        self.records = 0
        self.errors = 0
        self.dropped = 0
        self.last_error: str | None = None
        self.state = "running"
        self._pending: Mapping[str, Any] | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"stat-logger-{name}", daemon=True)
        self._thread.start()

    def offer(self, snapshot: Mapping[str, Any]) -> None:
        """Hand over a snapshot without waiting; replaces (and counts) one not yet taken."""
        with self._cond:
            if self._pending is not None:
                self.dropped += 1
            self._pending = snapshot
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._stop:
                    break
                snapshot, self._pending = self._pending, None
            try:
                # A copy per logger: one that edits its snapshot cannot change another's.
                self.instance.record(copy.deepcopy(snapshot))
            except Exception as exc:  # isolated: count it, keep feeding the logger
                error = f"{type(exc).__name__}: {exc}"
                with self._cond:
                    self.errors += 1
                    self.last_error = error
                    first = self.errors == 1
                if first:
                    log.error("stat logger failed", plugin=self.name, error=error)
            else:
                with self._cond:
                    self.records += 1
        try:
            self.instance.on_shutdown()
        except Exception as exc:
            log.warning("stat logger on_shutdown failed", plugin=self.name, error=str(exc))

    def stop(self) -> None:
        """Stop the thread (it runs ``on_shutdown``); wait up to ``stop_timeout``. Idempotent."""
        with self._cond:
            if self._stop:
                return
            self._stop = True
            self.state = "stopped"
            self._cond.notify()
        self._thread.join(self.stop_timeout)
        if self._thread.is_alive():
            # A record() that never returns: its daemon thread ends with the process.
            log.warning("stat logger did not stop in time", plugin=self.name)

    def as_dict(self) -> dict[str, Any]:
        with self._cond:
            out: dict[str, Any] = {
                "class": self.class_path,
                "state": self.state,
                "records": self.records,
                "errors": self.errors,
                "dropped": self.dropped,
            }
            if self.last_error is not None:
                out["last_error"] = self.last_error
        return out


class StatLoggers:
    """The scheduler's stat loggers, attached to the Scheduler's hooks."""

    def __init__(self, scheduler: Any, registry: PluginRegistry | None = None) -> None:
        self.scheduler = scheduler
        self.cfg: config_mod.Config = scheduler.cfg
        self.registry = registry or get_registry()
        self.slots: list[LoggerSlot] = []
        self.disabled: dict[str, dict[str, Any]] = {}
        self.interval = self.cfg.stat_logger_interval
        self._next = 0.0
        self._in_flight = False
        self._stopped = False

    def start(self) -> None:
        """Build and start every registered stat logger; raise PluginStartupError if strict."""
        sources.load(self.registry)
        for entry in self.registry.iter_entries("stat_logger"):
            instance = None
            try:
                cls = self.registry.get_class("stat_logger", entry.name)
                context = PluginContext(
                    name=entry.name,
                    category="stat_logger",
                    worker_id=-1,
                    num_workers=self.cfg.num_workers,
                    config_source=self.cfg.source,
                )
                instance = cls(logger_options(self.cfg, entry.name), context)
                instance.on_startup()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if instance is not None:
                    try:
                        instance.on_shutdown()
                    except Exception as shutdown_exc:  # already failing; keep the first error
                        log.warning("stat logger on_shutdown failed", error=str(shutdown_exc))
                if self.cfg.strict_plugins:
                    self.stop()
                    raise PluginStartupError(
                        f"stat_logger {entry.name!r} ({entry.class_path}) failed to start: "
                        f"{error} (strict_plugins is true)"
                    ) from exc
                log.error(
                    "stat logger failed to start; disabled, the daemon starts without it",
                    plugin=entry.name,
                    error=error,
                    hint="set strict_plugins: true to make this fatal",
                )
                self.disabled[entry.name] = {
                    "class": entry.class_path,
                    "state": "disabled",
                    "error": error,
                }
                continue
            self.slots.append(
                LoggerSlot(entry.name, entry.class_path, instance, self.cfg.plugin_stop_timeout)
            )
        known = set(self.registry.names("stat_logger"))
        for name in sorted(_option_owners(self.cfg) - known):
            log.warning(
                "extra_config names a stat logger that is not registered",
                key=f"{OPTION_PREFIX}{name}.*",
                known=sorted(known),
            )
        s = self.scheduler
        s.on_ready.append(self._on_ready)
        s.on_tick.append(self._on_tick)
        s.on_stopping.append(self.stop)
        s.status_extras.append(self.status)

    def _on_ready(self) -> None:
        self._next = time.monotonic() + self.interval

    def _on_tick(self) -> None:
        s = self.scheduler
        if not self.slots or self._stopped or self._in_flight or not s.ready:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        self._in_flight = True
        s.request_worker_stats(None, 0, self._deliver, deadline_s=self.cfg.health_deadline)

    def _deliver(self, pending: Any) -> None:
        # On the loop thread: build the status document once, then only hand it over.
        self._in_flight = False
        if self._stopped:
            return
        snapshot = self.scheduler.status_snapshot(pending)
        snapshot["time"] = time.time()
        for slot in self.slots:
            slot.offer(snapshot)

    def status(self) -> dict[str, Any]:
        loggers = dict(self.disabled)
        for slot in self.slots:
            loggers[slot.name] = slot.as_dict()
        return {"stat_loggers": loggers}

    def stop(self) -> None:
        """Stop every logger's thread (each runs its on_shutdown). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for slot in self.slots:
            slot.stop()
