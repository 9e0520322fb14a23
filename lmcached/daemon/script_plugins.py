"""Wire a PluginLauncher into the daemon's processes: the scheduler and each worker.

- The scheduler starts its plugins once the daemon is ready (every worker up), lists them in the
  ``status`` document under ``plugins``, stops them on shutdown, and on ``reload`` (the control
  op, ``lmcached reload`` or SIGHUP) re-reads the plugin keys of its config file, rescans, and
  sends SIGHUP to every worker so that each one rescans too.
- A worker starts its plugins once its data endpoint is bound, reports them in its ``stats``
  under ``plugins``, rescans on SIGHUP (re-reading the config file the scheduler keeps for
  workers) and stops them before it exits.

A reload changes only the plugin keys (``PLUGIN_KEYS``); the cache and every other key stay as
they are until a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from lmcached import config as config_mod
from lmcached import logs
from lmcached.runtime import instance_dir, ipc_endpoint
from lmcached.supervision.discovery import check_plugin_locations
from lmcached.supervision.launcher import PluginLauncher

# The keys a reload applies; every other change needs a restart.
PLUGIN_KEYS = (
    "plugin_locations",
    "plugin_stop_timeout",
    "plugin_config",
    "allow_insecure_plugin_locations",
    "plugin_log_rate_limit",
)
_RELOAD_WAIT_S = 5.0


def with_plugin_keys(current: config_mod.Config, new: config_mod.Config) -> config_mod.Config:
    """Return ``current`` with the plugin keys taken from ``new``."""
    return dataclasses.replace(current, **{k: getattr(new, k) for k in PLUGIN_KEYS})


def control_endpoint(cfg: config_mod.Config) -> str:
    """Return the scheduler's control endpoint that plugins get (ipc: same host, known early)."""
    return ipc_endpoint(cfg, "control")


class SchedulerPlugins:
    """The scheduler's plugins, attached to the Scheduler's hooks."""

    def __init__(self, scheduler: Any) -> None:
        check_plugin_locations(scheduler.cfg)  # before the daemon starts: `lmcached start` fails
        self.scheduler = scheduler
        self.log = logs.get_logger("lmcached.plugins")
        # A copy: a reload replaces the plugin keys here without touching the scheduler's.
        self.cfg = dataclasses.replace(scheduler.cfg)
        # The control endpoint is known once the scheduler has bound it: set in start().
        self.launcher = PluginLauncher(self.cfg, "scheduler")
        self._started = False
        scheduler.on_ready.append(self.start)
        scheduler.on_reload.append(self.reload)
        # Non-blocking: the scheduler's plugins stop while the workers stop theirs.
        scheduler.on_stopping.append(self.request_stop)
        scheduler.status_extras.append(self.status)

    def start(self) -> None:
        if not self._started:
            self._started = True
            endpoints = self.scheduler.control_endpoints
            self.launcher.control_endpoint = endpoints.get("ipc") or endpoints.get("tcp")
            self.launcher.start()

    def status(self) -> dict[str, Any]:
        return {"plugins": self.launcher.status()}

    def reload(self) -> dict[str, Any]:
        """Re-read the plugin keys, rescan here, and ask every worker to rescan (SIGHUP)."""
        ignored: list[str] = []
        if self.cfg.source:
            try:
                new = config_mod.load(self.cfg.source)
                check_plugin_locations(new)
            except config_mod.ConfigError as exc:
                self.log.error("plugin reload refused: config error", error=str(exc))
                return {"plugins": {"error": str(exc)}}
            # Converted values on both sides: to_dict() renders sizes as '256MiB', which never
            # equals the 268435456 the running config holds.
            ignored = [
                k
                for k in config_mod.key_names()
                if k not in PLUGIN_KEYS and getattr(new, k) != getattr(self.cfg, k)
            ]
            if ignored:
                self.log.warning("reload applies plugin keys only; restart for", keys=ignored)
            self.cfg = with_plugin_keys(self.cfg, new)
            self._update_worker_config(self.cfg)
        changes: dict[str, Any] = {}
        if self._started:
            try:
                changes = self.launcher.reload(self.cfg, timeout=_RELOAD_WAIT_S)
            except FutureTimeout:  # a busy supervisor: the rescan still happens, later
                self.log.warning("plugin rescan still running")
                changes = {"pending": True}
        signalled = []
        for slot in self.scheduler.slots:
            if slot.serving and slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGHUP)
                    signalled.append(slot.id)
        result: dict[str, Any] = {"scheduler": changes, "workers_signalled": signalled}
        if self.cfg.source and ignored:
            result["needs_restart"] = ignored
        return {"plugins": result}

    def _update_worker_config(self, cfg: config_mod.Config) -> None:
        """Rewrite the plugin keys in the config file workers read (mode 0600, atomic)."""
        path = Path(instance_dir(cfg)) / "config.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            self.log.warning("cannot update the workers' config", path=str(path), error=str(exc))
            return
        effective = cfg.to_dict(redact=False)
        data.update({k: effective[k] for k in PLUGIN_KEYS})
        tmp = path.with_suffix(".plugins.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def request_stop(self) -> None:
        self.launcher.request_stop()

    def stop(self) -> None:
        """Wait until every plugin of the scheduler is gone (bounded). Idempotent."""
        self.launcher.stop()


class WorkerPlugins:
    """One worker's plugins: started after the endpoint is bound, reloaded on SIGHUP."""

    def __init__(self, worker: Any, config_json: str) -> None:
        self.worker = worker
        self.config_json = config_json
        cfg = worker.cfg
        self.launcher = PluginLauncher(
            cfg, "worker", worker.worker_id, control_endpoint=control_endpoint(cfg)
        )
        worker.stats_extras.append(self.status)
        signal.signal(signal.SIGHUP, self._on_sighup)

    def start(self) -> None:
        self.launcher.start()

    def status(self) -> dict[str, Any]:
        return {"plugins": self.launcher.status()}

    def _load_config(self) -> config_mod.Config:
        with open(self.config_json) as f:
            new = config_mod.from_mapping(json.load(f), environ={})
        check_plugin_locations(new)
        return with_plugin_keys(self.worker.cfg, new)

    def _on_sighup(self, _signum: int, _frame: Any) -> None:
        self.launcher.request_reload(self._load_config)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to restore
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.launcher.stop()
