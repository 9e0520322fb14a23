"""Run the scheduler process: the scheduler, its script plugins and its operational side.

:func:`run` is the one place that composes them (``lmcached start`` calls it); the scheduler
knows none of them and only offers hook lists. The operational side is sd_notify, periodic
health checks, /metrics and /healthz: :func:`attach` wires one :class:`Operations` into a :class:`~lmcached.daemon.scheduler.Scheduler`
through the scheduler's hook lists; every probe of the workers goes through the scheduler's own
loop (``request_worker_stats``), so the HTTP thread never touches a loop-owned socket and a
wedged loop shows up as unhealthy instead of being papered over.

systemd sees: READY=1 once every worker serves; STATUS= with a one-line summary after each
health check; WATCHDOG=1 only after a check in which every worker answered within
``health_deadline``; RELOADING=1 (with MONOTONIC_USEC) on SIGHUP, then READY=1 when the reload
hooks are done; STOPPING=1 at shutdown.
"""

from __future__ import annotations

import contextlib
import queue
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any

from lmcached import config as config_mod
from lmcached import logs
from lmcached.daemon.metrics import ClusterSnapshot, MetricsServer, WorkerSample
from lmcached.daemon.scheduler import PendingStatus, Scheduler
from lmcached.daemon.script_plugins import SchedulerPlugins
from lmcached.daemon.sdnotify import Notifier
from lmcached.daemon.stat_loggers import StatLoggers
from lmcached.errors import EXIT_PLUGIN_FATAL
from lmcached.extensions.general import ProcessInfo, general_plugin_states, run_general_plugins
from lmcached.extensions.lifecycle import PluginStartupError
from lmcached.malloc import tune_for_large_messages
from lmcached.protocol import ErrorReply
from lmcached.security import AuthGuard, ClientCurve, ServerCurve
from lmcached.supervision.states import WORKER_UP


class Operations:
    """Own the notifier, the health-check schedule, the metrics server and the CURVE guard."""

    def __init__(self, scheduler: Scheduler, notifier: Notifier | None = None) -> None:
        self.scheduler = scheduler
        cfg = self.cfg = scheduler.cfg
        self.log = logs.get_logger("lmcached.ops")
        self.notifier = notifier if notifier is not None else Notifier.from_environment()
        self.curve = ServerCurve.from_config(cfg)
        self.auth: AuthGuard | None = None
        self.worker_curve: ClientCurve | None = None
        if self.curve is not None:
            self.auth = AuthGuard(scheduler.zmq_context, self.curve)
            # The scheduler talks to its workers as a CURVE client with the daemon's own keys.
            self.worker_curve = ClientCurve(self.curve.public, self.curve.secret, self.curve.public)
            self.auth.authorize(self.curve.public)
        interval = cfg.health_interval
        if self.notifier.watchdog_interval is not None:
            interval = min(interval, self.notifier.watchdog_interval)
        self.check_interval = interval
        self.metrics: MetricsServer | None = None
        if cfg.metrics_port is not None:
            port = 0 if cfg.port == 0 else cfg.metrics_port
            self.metrics = MetricsServer(cfg.metrics_host, port, self.snapshot)
        self.last_health: ClusterSnapshot | None = None
        self._requests: queue.SimpleQueue[Future[ClusterSnapshot]] = queue.SimpleQueue()
        self._next_check = 0.0
        self._check_in_flight = False
        self._ready_after_reload = False
        self._last_status = ""
        self._was_healthy: bool | None = None
        self._stopped = False

    # ----------------------------------------------------------------------------- wiring
    def attach(self) -> None:
        s = self.scheduler
        s.auth, s.worker_curve = self.auth, self.worker_curve
        s.on_ready.append(self._on_ready)
        s.on_tick.append(self._on_tick)
        # First, so RELOADING=1 precedes whatever the other reload hooks do.
        s.on_reload.insert(0, self._on_reload)
        s.on_stopping.append(self.stop)
        s.status_extras.append(self._status_extra)
        if self.metrics is not None:
            self.metrics.start()  # binds now: a taken port fails the start, loudly
            self.log.info("metrics_listening", url=self.metrics_url)
            # Published with the control endpoints (port 0 makes the metrics port ephemeral).
            s.endpoint_extras["metrics"] = self.metrics_url

    @property
    def metrics_url(self) -> str | None:
        if self.metrics is None:
            return None
        return f"http://{self.cfg.metrics_host}:{self.metrics.port}"

    # ------------------------------------------------------------------------------ hooks
    def _on_ready(self) -> None:
        n = len(self.scheduler.slots)
        self.notifier.ready(status=f"{n}/{n} workers serving")
        self._next_check = time.monotonic()

    def _on_tick(self) -> None:
        s = self.scheduler
        while True:
            try:
                fut = self._requests.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                s.request_worker_stats(
                    None,
                    0,
                    partial(self._answer_request, fut),
                    deadline_s=self.cfg.health_deadline,
                )
        now = time.monotonic()
        if s.ready and not self._check_in_flight and now >= self._next_check:
            self._check_in_flight = True
            self._next_check = now + self.check_interval
            s.request_worker_stats(
                None, 0, self._on_health_check, deadline_s=self.cfg.health_deadline
            )
        if self._ready_after_reload:
            self._ready_after_reload = False
            self.notifier.ready(status="reloaded")

    def _on_reload(self) -> dict[str, Any]:
        self.notifier.reloading(status="reloading")
        self._ready_after_reload = True
        if self.auth is not None:
            self.auth.reload()
            return {"curve_clients": self.auth.authorized_count}
        return {}

    def _on_health_check(self, pending: PendingStatus) -> None:
        self._check_in_flight = False
        snap = self.snapshot_from(pending)
        self.last_health = snap
        problems = snap.problems()
        if not problems:
            # Only a passing check feeds the watchdog: a wedged worker stops the pings.
            self.notifier.watchdog()
        if (not problems) != self._was_healthy:
            self._was_healthy = not problems
            if problems:
                self.log.warning("unhealthy", problems=problems)
            else:
                self.log.info("healthy", workers=len(snap.workers))
        status = summary_line(snap)
        if status != self._last_status:
            self._last_status = status
            self.notifier.status(status)

    def _status_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"metrics": self.metrics_url}
        if self.auth is not None:
            extra["auth_refused"] = self.auth.refused
        return extra

    # -------------------------------------------------------------------------- snapshots
    def _answer_request(self, fut: Future[ClusterSnapshot], pending: PendingStatus) -> None:
        fut.set_result(self.snapshot_from(pending))

    def snapshot_from(self, pending: PendingStatus) -> ClusterSnapshot:
        """Build a snapshot from a finished stats round (loop thread)."""
        s = self.scheduler
        deadline = self.cfg.health_deadline
        elapsed = max(0.0, time.monotonic() - (pending.deadline - deadline))
        workers = []
        for slot in s.slots:
            reply = pending.replies.get(slot.id)
            if not slot.serving:
                error = f"worker is {slot.state}"
                if slot.last_exit is not None:
                    error += f" (last exit code {slot.last_exit})"
                workers.append(WorkerSample(slot.id, None, elapsed, error))
            elif reply is None:
                workers.append(
                    WorkerSample(slot.id, None, elapsed, f"no answer within {deadline} s")
                )
            elif isinstance(reply, ErrorReply):
                workers.append(WorkerSample(slot.id, None, elapsed, reply.error))
            else:
                workers.append(WorkerSample(slot.id, reply.stats, elapsed))
        state = "stopping" if s.stopping else ("running" if s.ready else "starting")
        # Plugin supervisors report through `status` extras ({"plugins": [{name, role, state,
        # restarts, worker_id}]}); the same list becomes lmcached_plugin_* metrics.
        plugins: list[Any] = []
        # Stat loggers and general plugins report {name: {...}} through extras too.
        named: dict[str, dict[str, Any]] = {"stat_loggers": {}, "general_plugins": {}}
        for extra in s.status_extras:
            if extra == self._status_extra:
                continue
            try:
                reported = extra()
            except Exception:
                self.log.exception("status_extra_failed")
                continue
            if isinstance(reported.get("plugins"), list):
                plugins.extend(reported["plugins"])
            for section, found in named.items():
                if isinstance(reported.get(section), dict):
                    found.update(reported[section])
        return ClusterSnapshot(
            workers=workers,
            expected_workers=len(s.slots),
            deadline=deadline,
            scheduler={
                "state": state,
                "epoch": s.epoch,
                "worker_restarts": {slot.id: slot.restarts for slot in s.slots},
                "auth_refused": self.auth.refused if self.auth is not None else 0,
                "plugins": plugins,
                **named,
            },
        )

    def snapshot(self) -> ClusterSnapshot:
        """Probe every worker through the scheduler loop (any thread); bounded by the deadline."""
        fut: Future[ClusterSnapshot] = Future()
        self._requests.put(fut)
        wait = self.cfg.health_deadline + 1.0  # the loop polls every 100 ms
        try:
            return fut.result(timeout=wait)
        except FutureTimeout:
            fut.cancel()
            return ClusterSnapshot(
                workers=[],
                expected_workers=len(self.scheduler.slots),
                deadline=wait,
                scheduler={"state": "unresponsive"},
            )

    def stop(self) -> None:
        """Announce STOPPING=1 and stop the HTTP server and the CURVE guard. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.notifier.stopping(status="stopping")
        if self.metrics is not None:
            self.metrics.stop()
        if self.auth is not None:
            self.auth.stop()
        # Anyone still waiting for a probe gets the truth: we are going away.
        with contextlib.suppress(queue.Empty):
            while True:
                self._requests.get_nowait().cancel()
        self.notifier.close()


def summary_line(snap: ClusterSnapshot) -> str:
    """Return the one-line STATUS= text: workers up, blocks and bytes held, retrieve hits."""
    up = sum(1 for w in snap.workers if w.ok)
    blocks = used = 0
    keys = hits = 0
    for w in snap.workers:
        if w.stats is None:
            continue
        for tier in (w.stats.get("store") or {}).values():
            if isinstance(tier, dict):
                blocks += int(tier.get("entries", 0) or 0)
                used += int(tier.get("used_bytes", 0) or 0)
        lat = w.stats.get("latency") or {}
        keys += int(lat.get("retrieve_keys", 0) or 0)
        hits += int(lat.get("retrieve_hits", 0) or 0)
    text = f"{up}/{snap.expected_workers} workers serving; {blocks} blocks, {used >> 20} MiB"
    if keys:
        text += f"; retrieve hits {hits / keys:.0%}"
    problems = snap.problems()
    if problems:
        text += f"; UNHEALTHY: {problems[0]}"
    return text


def attach(scheduler: Scheduler) -> Operations:
    """Create the scheduler's Operations and hook it in; call before ``scheduler.start()``."""
    ops = Operations(scheduler)
    ops.attach()
    return ops


def run(cfg: config_mod.Config) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT or a shutdown request."""
    tune_for_large_messages(daemon=True)
    logs.configure("scheduler", -1, cfg.log_level, cfg.log_format)
    log = logs.get_logger("lmcached.daemon.scheduler")
    warning = config_mod.memory_warning(cfg)
    if warning:
        log.warning("memory_budget", message=warning)
    for note in cfg.warnings:  # LMCache keys accepted but not honoured, once each
        log.warning("config_key_ignored", message=note)
    try:
        # vLLM's rule: general plugins run first in every process, before anything is bound.
        run_general_plugins(ProcessInfo("scheduler", None, cfg.source), strict=cfg.strict_plugins)
    except PluginStartupError as exc:
        log.error("plugin_start_failed", error=str(exc))
        return EXIT_PLUGIN_FATAL
    scheduler = Scheduler(cfg)
    plugins = SchedulerPlugins(scheduler)
    stat_loggers = StatLoggers(scheduler)
    scheduler.status_extras.append(lambda: {"general_plugins": general_plugin_states()})
    scheduler.install_signal_handlers()
    try:
        try:
            stat_loggers.start()
        except PluginStartupError as exc:
            log.error("plugin_start_failed", error=str(exc))
            return EXIT_PLUGIN_FATAL
        attach(scheduler)  # sd_notify, health checks, /metrics, CURVE
        scheduler.start()
        scheduler.serve()
    finally:
        scheduler.shutdown()
        stat_loggers.stop()
        plugins.stop()
    return scheduler.exit_code


def health_of_status(status: dict[str, Any]) -> list[str]:
    """Return the health problems of a `status` document, by the same rules as /healthz."""
    workers = []
    for w in status.get("workers", []):
        if w.get("state") != WORKER_UP:
            workers.append(WorkerSample(int(w["id"]), None, 0.0, f"worker is {w.get('state')}"))
        elif not w.get("responsive"):
            workers.append(WorkerSample(int(w["id"]), None, 0.0, "no answer within the deadline"))
        else:
            workers.append(WorkerSample(int(w["id"]), w.get("stats") or {}, 0.0))
    state = "running" if status.get("ready") else "starting"
    snap = ClusterSnapshot(workers, len(workers), 0.0, scheduler={"state": state})
    return snap.problems()
