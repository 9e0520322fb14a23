"""Launch and supervise the script plugins of one daemon process (the scheduler or one worker).

One :class:`PluginLauncher` per process. It owns one long-lived thread, the *supervisor*, which
does everything that touches plugin processes: it spawns them (always from that one thread, so a
thread's exit never fires a death signal early), reads their output, advances their state
machines and stops them. The daemon's own loop only sends commands (start, reload, stop) and
reads a status snapshot, so a plugin can never block or slow the request loop.

Each plugin runs under a shim (:mod:`lmcached.supervision.shim`) that owns the plugin's process group
and kills it when the launcher asks (SIGTERM), when the plugin's main process exits, or when the
launcher's process dies (EOF on the *lifeline* pipe, whose write end only this process holds).

States are :mod:`lmcached.supervision.states`' (Supervisor's), with these policies:

- STARTING becomes RUNNING after ``start_seconds`` alive (the grace period).
- BACKOFF: exited and waiting to be restarted (``restart`` policy), delay doubling from
  ``backoff`` up to 60 s.
- STOPPING: SIGTERM sent to its group; SIGKILL after ``plugin_stop_timeout``.
- EXITED: exited and not restarted (``restart: never``, or ``on-failure`` after a clean exit).
- FATAL: could not be started (missing interpreter) or failed while STARTING more than
  ``max_retries`` times in a row.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import structlog

from lmcached.config import Config
from lmcached.supervision import discovery
from lmcached.supervision.discovery import SCHEDULER, WORKER, InterpreterError, PluginFile
from lmcached.supervision.orphans import OWNER_ENV, OrphanReaper, become_subreaper
from lmcached.supervision.states import ProcessLife, ProcessState, RestartPolicy

SHIM_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.py")

# Output handling.
MAX_LINE_BYTES = 8192
_READ_CHUNK = 1 << 16
_BURST_FACTOR = 10  # the bucket holds 10 s worth of lines
_PAUSE_WHEN_LIMITED = 0.2  # stop reading a flooding stream for this long (the plugin then waits)
_DROP_REPORT_INTERVAL = 1.0
_ENV_WORD = re.compile(r"[^A-Za-z0-9]+")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# Supervision.
_BACKOFF_CAP = 60.0
_SHIM_GRACE = 3.0  # beyond plugin_stop_timeout, before the launcher kills the shim itself
_TICK = 0.5
# How often the owner looks for orphans re-parented to it (besides at every shim exit).
_ORPHAN_SWEEP_S = 2.0
# What of the daemon's environment a plugin never sees: the daemon's own settings (secrets among
# them: a remote_url with a password, key-file paths) and systemd's channel to the daemon. Kept
# from those prefixes: what is addressed to plugins.
_SCRUBBED_PREFIXES = ("LMCACHED_", "LMCACHE_")
_KEPT_PREFIXES = ("LMCACHE_PLUGIN_", "LMCACHE_RUNTIME_PLUGIN_")
_KEPT_NAMES = frozenset({"LMCACHED_CONTROL_ENDPOINT"})
_SYSTEMD_NAMES = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"}
)


# Plugins follow the one process life of lmcached.supervision.states (the name is kept for
# callers of this module).
PluginState = ProcessState
S = ProcessState


@dataclass(frozen=True)
class PluginPolicy:
    """One plugin's entry of ``plugin_config`` with defaults filled in."""

    restart: str = "never"
    max_retries: int = 3
    backoff: float = 1.0
    start_seconds: float = 1.0
    enabled: bool = True
    rlimits: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Config, name: str) -> PluginPolicy:
        return cls(**cfg.plugin_config.get(name, {}))

    @property
    def timing(self) -> RestartPolicy:
        """The grace period and backoff of this plugin's process life."""
        return RestartPolicy(
            grace=self.start_seconds,
            backoff=self.backoff,
            backoff_cap=_BACKOFF_CAP,
            max_retries=self.max_retries,
        )


class _OutputStream:
    """Split one pipe's bytes into log lines: partial lines kept, long lines cut, junk escaped."""

    def __init__(self, fd: int, stream: str) -> None:
        self.fd = fd
        self.stream = stream
        self.pending = b""
        self.discarding = False  # inside an over-long line, dropping bytes up to its newline
        self.paused_until = 0.0
        self.closed = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if self.discarding:
            newline = chunk.find(b"\n")
            if newline < 0:
                return []
            chunk = chunk[newline + 1 :]
            self.discarding = False
        parts = (self.pending + chunk).split(b"\n")
        self.pending = parts.pop()
        if len(self.pending) > MAX_LINE_BYTES:
            parts.append(self.pending)
            self.pending = b""
            self.discarding = True
        return parts

    def flush(self) -> list[bytes]:
        rest, self.pending = self.pending, b""
        return [rest] if rest else []


def decode_line(raw: bytes) -> str:
    """Return one output line as printable text: cut, UTF-8 with escapes, no control characters."""
    cut = len(raw) > MAX_LINE_BYTES
    text = raw[:MAX_LINE_BYTES].rstrip(b"\r").decode("utf-8", "backslashreplace")
    text = _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text + " [line truncated]" if cut else text


class _Plugin:
    """The supervisor's record of one plugin: its file, policy, process and state."""

    def __init__(self, file: PluginFile, policy: PluginPolicy) -> None:
        self.file = file
        self.policy = policy
        self.life = ProcessLife(f"plugin {file.name}")
        self.shim: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.status_fd: int | None = None
        self.status_pending = b""
        self.status_eof = False
        self.streams: list[_OutputStream] = []
        self.exit_code: int | None = None
        self.last_error: str | None = None
        self.spawn_error: str | None = None
        self.argv: list[str] | None = None
        self.stop_deadline = 0.0
        self.replacement: tuple[PluginFile, PluginPolicy] | None = None
        self.remove_when_stopped = False
        # Output rate limit: a token bucket shared by stdout and stderr.
        self.tokens = 0.0
        self.tokens_at = time.monotonic()
        self.dropped = 0
        self.dropped_reported = 0
        self.dropped_reported_at = float("-inf")  # the first drop is reported at once

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def state(self) -> ProcessState:
        return self.life.state

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.file.path,
            "target": self.file.target.describe(),
            "state": self.state.value,
            "pid": self.pid,
            "shim_pid": self.shim.pid if self.shim is not None else None,
            "restarts": self.life.restarts,
            "exit_code": self.exit_code,
            "last_error": self.last_error,
            "since": self.life.since,
            "restart_policy": self.policy.restart,
            "command": self.argv,
            "dropped_lines": self.dropped,
        }


class PluginLauncher:
    """Run this process's script plugins as supervised subprocesses (see the module doc).

    ``role`` is ``"scheduler"`` or ``"worker"``; ``worker_id`` is the worker's id (ignored on the
    scheduler, whose plugins see ``-1``). ``control_endpoint`` is given to plugins as
    ``LMCACHED_CONTROL_ENDPOINT``. Call :meth:`start` once the process serves requests,
    :meth:`reload` to rescan, :meth:`status` for a snapshot and :meth:`stop` (idempotent) on
    shutdown.
    """

    def __init__(
        self,
        cfg: Config,
        role: str,
        worker_id: int = -1,
        *,
        control_endpoint: str | None = None,
        logger: Any = None,
    ) -> None:
        role = role.upper()
        if role not in (SCHEDULER, WORKER):
            raise ValueError(f"role must be 'scheduler' or 'worker', got {role!r}")
        self.cfg = cfg
        self.role = role
        self.worker_id = worker_id if role == WORKER else -1
        self.control_endpoint = control_endpoint
        base = logger if logger is not None else structlog.get_logger("lmcached.plugins")
        self.log = base.bind(role=role.lower(), worker_id=self.worker_id)
        self._plugins: dict[str, _Plugin] = {}
        self._commands: queue.SimpleQueue[tuple[str, Any, Future[Any]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # The lifeline: shims get the read end; only this process holds the write end (not
        # inheritable, so no other child gets it). When this process dies, shims see EOF.
        self._lifeline_r, self._lifeline_w = os.pipe()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._snapshot: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stop_requested = False
        self._stopped = False
        self._stopping_all = False
        self._orphans = OrphanReaper(self._shim_pids)
        self._next_sweep = 0.0

    # -- public API (any thread) -----------------------------------------------------------------

    def start(self) -> dict[str, list[str]]:
        """Scan the plugin locations and launch this process's plugins; return what started."""
        with self._lock:
            if self._stop_requested:
                raise RuntimeError("PluginLauncher was stopped; make a new one")
            if self._thread is None:
                # Descendants of a shim killed with -9 come to us, not to init: see orphans.py.
                if not become_subreaper():
                    self.log.warning("cannot become a child subreaper; orphans go to init")
                self._thread = threading.Thread(
                    target=self._run, name=f"plugins-{self.role.lower()}", daemon=True
                )
                self._thread.start()
        return self._call("reload", None)

    def reload(self, cfg: Config | None = None, timeout: float = 30.0) -> dict[str, list[str]]:
        """Rescan: start new plugins, stop removed ones, restart changed ones; return the names.

        ``cfg`` replaces the configuration (plugin locations and per-plugin settings) when given.
        The cache is not touched. FATAL plugins whose file is unchanged are tried again, so an
        interpreter installed since the last attempt gets picked up.
        """
        if self._thread is None:
            raise RuntimeError("PluginLauncher.reload() before start()")
        if self._stop_requested:
            raise RuntimeError("PluginLauncher is stopped")
        return self._call("reload", cfg, timeout)

    def request_reload(self, load_config: Callable[[], Config] | None = None) -> None:
        """Queue a reload without waiting; safe to call from a signal handler.

        ``load_config`` runs on the supervisor thread and returns the new configuration; if it
        raises, the error is logged and the current configuration is kept.
        """
        if self._thread is None or self._stopped:
            return
        # SimpleQueue.put is reentrant, so this may run inside a signal handler.
        self._commands.put(("reload_with", load_config, Future()))
        self._wake()

    def status(self) -> list[dict[str, Any]]:
        """Return one dict per plugin: name, state, pid, restarts, exit code, last error ..."""
        return [dict(s) for s in self._snapshot]

    def request_stop(self) -> None:
        """Start stopping every plugin without waiting (see :meth:`stop`). Idempotent."""
        with self._lock:
            if self._stop_requested:
                return
            self._stop_requested = True
            thread = self._thread
        if thread is not None:
            self._commands.put(("stop_all", None, Future()))
            self._wake()

    def stop(self, timeout: float | None = None) -> None:
        """Stop every plugin (SIGTERM, then SIGKILL after plugin_stop_timeout) and the thread.

        Idempotent. Returns within about ``plugin_stop_timeout`` + 5 s even if a shim hangs.
        """
        self.request_stop()
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        if thread is not None:
            limit = timeout if timeout is not None else self.cfg.plugin_stop_timeout + 5.0
            thread.join(limit)
            if thread.is_alive():
                self.log.error("plugin supervisor did not stop in time", timeout=limit)
                return  # the thread is a daemon; the lifeline closes when the process exits
        self._close_fds()

    close = stop

    def __enter__(self) -> PluginLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- command plumbing ------------------------------------------------------------------------

    def _call(self, op: str, arg: Any, timeout: float = 30.0) -> Any:
        done: Future[Any] = Future()
        self._commands.put((op, arg, done))
        self._wake()
        return done.result(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full pipe: a wake-up is pending anyway
            os.write(self._wake_w, b"x")

    def _close_fds(self) -> None:
        """Close the launcher's own fds; called once, after the supervisor thread ended."""
        self._close_lifeline()
        for fd in (self._lifeline_r, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(Exception):
            self._selector.close()

    # -- the supervisor thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if self._handle_commands():
                    break
                self._advance_all()
                self._publish()
                self._wait_for_events()
            self._publish()
        except Exception:
            self.log.exception("plugin supervisor crashed; stopping every plugin")
            self._kill_all_now()
            self._publish()
        finally:
            self._close_lifeline()
            with self._lock:
                self._stop_requested = True  # nothing will serve commands from now on
            while True:  # answer what is still queued, so no caller waits for nothing
                try:
                    _, _, done = self._commands.get_nowait()
                except queue.Empty:
                    break
                if not done.done():
                    done.set_exception(RuntimeError("PluginLauncher is stopped"))

    def _close_lifeline(self) -> None:
        # Closed exactly once: a second close could hit an fd number reused meanwhile.
        fd, self._lifeline_w = self._lifeline_w, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _handle_commands(self) -> bool:
        """Run queued commands; return True when the supervisor is done (stop_all finished)."""
        while True:
            try:
                op, arg, done = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                if op == "reload":
                    done.set_result(self._reload(arg))
                elif op == "reload_with":
                    try:
                        new_cfg = arg() if arg is not None else None
                    except Exception as exc:
                        self.log.error("plugin reload: cannot load the config", error=str(exc))
                        new_cfg = None
                        done.set_exception(exc)
                        continue
                    done.set_result(self._reload(new_cfg))
                elif op == "stop_all":
                    self._stop_all()
                    done.set_result(None)
                    return True
            except Exception as exc:  # report to the caller, keep supervising
                done.set_exception(exc)
        return False

    def _wait_for_events(self) -> None:
        now = time.monotonic()
        timeout = _TICK
        for p in self._plugins.values():
            for deadline in self._deadlines(p):
                timeout = min(timeout, max(0.0, deadline - now))
        for key, _ in self._selector.select(timeout):
            owner = key.data
            if owner is None:
                with contextlib.suppress(OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            else:
                plugin, stream = owner
                if stream is None:
                    self._read_status(plugin)
                else:
                    self._read_output(plugin, stream)

    def _deadlines(self, p: _Plugin) -> list[float]:
        out = [s.paused_until for s in p.streams if s.paused_until and not s.closed]
        if p.state == S.STARTING and p.pid is not None:
            out.append(p.life.started_at + p.policy.start_seconds)
        elif p.state == S.BACKOFF:
            out.append(p.life.retry_at)
        elif p.state == S.STOPPING:
            out.append(p.stop_deadline)
        return out

    # -- state machine ---------------------------------------------------------------------------

    def _transition(self, p: _Plugin, new: ProcessState, **info: Any) -> None:
        """Advance ``p`` to state ``new`` (through its ProcessLife) and log the change."""
        old = p.life.advance(new)
        level = "error" if new == S.FATAL else "info"
        getattr(self.log, level)(
            "plugin state", plugin=p.name, old=old.value, new=new.value, pid=p.pid, **info
        )

    def _shim_pids(self) -> set[int]:
        return {p.shim.pid for p in self._plugins.values() if p.shim is not None}

    def _sweep_orphans(self) -> None:
        self._next_sweep = time.monotonic() + _ORPHAN_SWEEP_S
        killed = self._orphans.sweep()
        if killed:
            self.log.warning("killed plugin processes left by a dead shim", processes=killed)

    def _advance_all(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep_orphans()
        for p in list(self._plugins.values()):
            self._resume_streams(p, now)
            self._report_drops(p, now)
            if p.shim is not None and p.status_eof and p.shim.poll() is not None:
                self._on_shim_exit(p)
            if p.state == S.STARTING and p.pid is not None:
                if p.life.succeeded(now, p.policy.timing):
                    self._transition(p, S.RUNNING)
            elif p.life.due(now):
                p.life.restarts += 1
                self._spawn(p)
            elif p.state == S.STOPPING and now >= p.stop_deadline and p.shim is not None:
                # The shim did not finish in time: kill it, and the group it owned.
                self.log.warning("plugin shim did not stop in time; killing", plugin=p.name)
                self._kill_now(p)
            self._after_stop(p)

    def _spawn(self, p: _Plugin) -> None:
        """Start ``p`` under a new shim (STARTING), or mark it FATAL when it cannot start."""
        p.exit_code = None
        p.pid = None
        p.spawn_error = None
        try:
            p.argv = discovery.interpreter_command(p.file.path)
        except (InterpreterError, OSError) as exc:
            p.last_error = str(exc)
            self.log.error("plugin cannot start", plugin=p.name, error=str(exc))
            self._transition(p, S.FATAL, error=str(exc))
            return
        status_r, status_w = os.pipe()
        spec = {
            "argv": p.argv,
            "cwd": os.path.dirname(p.file.path),
            "stop_timeout": self.cfg.plugin_stop_timeout,
            "rlimits": p.policy.rlimits,
            "lifeline_fd": self._lifeline_r,
            "status_fd": status_w,
        }
        try:
            shim = subprocess.Popen(
                [sys.executable, SHIM_PATH, json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._environment(p),
                pass_fds=(self._lifeline_r, status_w),
                close_fds=True,
            )
        except OSError as exc:
            os.close(status_r)
            os.close(status_w)
            p.last_error = f"cannot start the plugin shim: {exc}"
            self._transition(p, S.FATAL, error=p.last_error)
            return
        os.close(status_w)
        p.shim = shim
        p.status_fd, p.status_pending, p.status_eof = status_r, b"", False
        os.set_blocking(status_r, False)
        self._selector.register(status_r, selectors.EVENT_READ, (p, None))
        p.streams = []
        assert shim.stdout is not None and shim.stderr is not None
        for pipe, name in ((shim.stdout, "stdout"), (shim.stderr, "stderr")):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            stream = _OutputStream(fd, name)
            p.streams.append(stream)
            self._selector.register(fd, selectors.EVENT_READ, (p, stream))
        p.tokens = float(self.cfg.plugin_log_rate_limit * _BURST_FACTOR)
        p.tokens_at = time.monotonic()
        self._transition(p, S.STARTING, command=p.argv)

    def _on_shim_exit(self, p: _Plugin) -> None:
        """The shim is gone, so nothing of the plugin runs: decide the plugin's next state."""
        shim = p.shim
        assert shim is not None
        if p.pid is not None and p.exit_code is None:
            # The shim died without cleaning up (killed by the OOM killer, say): its plugin got
            # SIGKILL through the death signal; take down what is left of the plugin's group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            # What left the group (setsid) was re-parented to us, the subreaper: end it too.
            self._sweep_orphans()
        for stream in p.streams:
            self._drain(p, stream)
        self._close_process_fds(p)
        p.shim = None
        self._report_drops(p, time.monotonic(), force=True)
        if p.state == S.STOPPING:
            self._transition(p, S.STOPPED, exit_code=p.exit_code)
            return
        if p.spawn_error is None and p.pid is None:
            # The shim died before it could start the plugin: an internal failure, not the
            # plugin's; its stderr (a traceback) is in the log under the plugin's name.
            p.spawn_error = f"the plugin shim exited with {shim.returncode} before starting it"
        if p.spawn_error is not None:
            p.last_error = p.spawn_error
            self._transition(p, S.FATAL, error=p.spawn_error)
            return
        if p.exit_code is None:
            p.last_error = f"the plugin shim exited with {shim.returncode} without an exit status"
        failed = p.exit_code != 0
        if p.exit_code is not None and p.exit_code != 0:
            p.last_error = f"exited with {_describe_exit(p.exit_code)}"
        restart = p.policy.restart == "always" or (p.policy.restart == "on-failure" and failed)
        if not restart:
            self._transition(p, S.EXITED, exit_code=p.exit_code)
            return
        delay = p.life.exited(time.monotonic(), p.policy.timing)
        if delay is None:
            p.last_error = (
                f"exited with {_describe_exit(p.exit_code)} while starting "
                f"{p.life.fast_failures} times in a row (max_retries {p.policy.max_retries})"
            )
            self._transition(p, S.FATAL, exit_code=p.exit_code, error=p.last_error)
            return
        self._transition(p, S.BACKOFF, exit_code=p.exit_code, delay=round(delay, 3))

    def _request_stop(self, p: _Plugin) -> None:
        """Ask ``p`` to stop: SIGTERM to its shim (which signals the plugin's whole group)."""
        if p.state in (S.STARTING, S.RUNNING) and p.shim is not None:
            self._transition(p, S.STOPPING)
            p.stop_deadline = time.monotonic() + self.cfg.plugin_stop_timeout + _SHIM_GRACE
            with contextlib.suppress(ProcessLookupError):
                p.shim.send_signal(signal.SIGTERM)
        elif p.state == S.BACKOFF:
            self._transition(p, S.STOPPED)

    def _after_stop(self, p: _Plugin) -> None:
        """Apply a pending replacement (changed file) or removal once ``p`` has stopped."""
        if p.state in (S.STARTING, S.RUNNING, S.STOPPING, S.BACKOFF) or p.shim is not None:
            return
        if p.remove_when_stopped:
            del self._plugins[p.name]
        elif p.replacement is not None:
            p.file, p.policy = p.replacement
            p.replacement = None
            p.life.fast_failures = 0
            if p.state == S.EXITED:
                self._transition(p, S.STOPPED)
            if p.state in (S.STOPPED, S.FATAL):
                self._spawn(p)

    def _kill_now(self, p: _Plugin) -> None:
        if p.shim is not None:
            with contextlib.suppress(ProcessLookupError):
                p.shim.kill()
        if p.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        if p.shim is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.shim.wait(2.0)
            p.status_eof = True

    def _stop_all(self) -> None:
        """Stop every plugin and wait until their shims are gone (bounded)."""
        self._stopping_all = True
        for p in self._plugins.values():
            p.replacement = None
            self._request_stop(p)
        deadline = time.monotonic() + self.cfg.plugin_stop_timeout + _SHIM_GRACE
        while any(p.shim is not None for p in self._plugins.values()):
            if time.monotonic() >= deadline:
                self._kill_all_now()
            self._advance_all()
            self._publish()
            self._wait_for_events()
        self._close_lifeline()
        # A shim killed during the stop left its orphans to us; end and reap them (bounded).
        deadline = time.monotonic() + 2.0
        self._sweep_orphans()
        while self._orphans.pending and time.monotonic() < deadline:
            time.sleep(0.05)
            self._sweep_orphans()

    def _kill_all_now(self) -> None:
        for p in self._plugins.values():
            self._kill_now(p)
            if p.shim is not None:
                self._on_shim_exit(p)

    # -- reload ----------------------------------------------------------------------------------

    def _reload(self, new_cfg: Config | None) -> dict[str, list[str]]:
        if new_cfg is not None:
            self.cfg = new_cfg
        cfg = self.cfg
        result = discovery.scan(
            cfg.plugin_locations, allow_insecure=cfg.allow_insecure_plugin_locations
        )
        for line in result.errors:
            self.log.error(line)
        reporter = self.role == SCHEDULER  # one process reports shared findings, not N+1
        if reporter:
            for line in result.warnings:
                self.log.warning(line)
        for line in result.debug:
            self.log.debug(line)
        wanted: dict[str, tuple[PluginFile, PluginPolicy]] = {}
        for f in result.plugins:
            tid = f.target.worker_id
            if reporter and tid is not None and tid >= cfg.num_workers:
                self.log.warning(
                    "plugin targets a worker that does not exist; it will not run",
                    plugin=f.name,
                    worker_id=tid,
                    num_workers=cfg.num_workers,
                )
            if not f.target.selects(self.role, self.worker_id):
                continue
            policy = PluginPolicy.from_config(cfg, f.name)
            if not policy.enabled:
                self.log.info("plugin disabled in plugin_config", plugin=f.name)
                continue
            wanted[f.name] = (f, policy)
        if reporter:
            found = {f.name for f in result.plugins}
            for name in cfg.plugin_config:
                if name not in found:
                    self.log.warning("plugin_config names a plugin that was not found", plugin=name)

        changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "retried": []}
        for name, running in self._plugins.items():
            if name not in wanted:
                changes["removed"].append(name)
                running.remove_when_stopped = True
                running.replacement = None
                self._request_stop(running)
        for name, (f, policy) in wanted.items():
            p = self._plugins.get(name)
            if p is None or p.remove_when_stopped:
                if p is not None:  # removed earlier, reappeared before it finished stopping
                    p.remove_when_stopped = False
                    p.replacement = (f, policy)
                    changes["changed"].append(name)
                    continue
                p = _Plugin(f, policy)
                self._plugins[name] = p
                changes["added"].append(name)
                self._spawn(p)
            elif (f, policy) != (p.file, p.policy) and p.replacement != (f, policy):
                changes["changed"].append(name)
                p.replacement = (f, policy)
                self._request_stop(p)
            elif p.state == S.FATAL:
                changes["retried"].append(name)
                p.life.fast_failures = 0
                self._spawn(p)
        for p in list(self._plugins.values()):
            self._after_stop(p)
        self._publish()
        summary = {k: v for k, v in changes.items() if v}
        if summary:
            self.log.info("plugins rescanned", **summary)
        return changes

    # -- environment -----------------------------------------------------------------------------

    def _environment(self, p: _Plugin) -> dict[str, str]:
        """Return the plugin's environment: the daemon's, scrubbed (:func:`scrubbed_environment`),
        plus the LMCACHE_PLUGIN_* (and _RUNTIME_) variables and the owner tag."""
        summary = self.cfg.to_dict(redact=True)
        summary.pop("plugin_config", None)
        summary["config_file"] = self.cfg.source
        # The plugin's own settings are addressed to it, so they pass verbatim; everything from
        # the daemon's config is redacted (URL passwords, secret keys).
        summary["plugin"] = {"name": p.name, "settings": p.policy.settings}
        values = {
            "ROLE": self.role,
            "WORKER_ID": str(self.worker_id),
            "WORKER_COUNT": str(self.cfg.num_workers),
            "CONFIG": json.dumps(summary, default=str, sort_keys=True),
            "NAME": p.name,
        }
        env = scrubbed_environment(os.environ)
        env[OWNER_ENV] = str(os.getpid())
        for key, value in values.items():
            env[f"LMCACHE_PLUGIN_{key}"] = value
            env[f"LMCACHE_RUNTIME_PLUGIN_{key}"] = value
        # Scalar settings also come as LMCACHE_PLUGIN_SETTING_<KEY>, so a shell plugin needs no
        # JSON parser for them.
        for key, value in p.policy.settings.items():
            if isinstance(value, (str, int, float, bool)):
                text = str(value).lower() if isinstance(value, bool) else str(value)
                env[f"LMCACHE_PLUGIN_SETTING_{_ENV_WORD.sub('_', key).upper()}"] = text
        if self.control_endpoint:
            env["LMCACHED_CONTROL_ENDPOINT"] = self.control_endpoint
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- I/O -------------------------------------------------------------------------------------

    def _read_status(self, p: _Plugin) -> None:
        fd = p.status_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            p.status_eof = True
            self._selector.unregister(fd)
            os.close(fd)
            p.status_fd = None
            if p.shim is not None:
                # The shim closes its status pipe only when it exits: reap it now, so the next
                # state is decided at once rather than at the next tick.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.shim.wait(1.0)
            data, p.status_pending = p.status_pending + b"\n", b""
        lines = (p.status_pending + data).split(b"\n")
        p.status_pending = lines.pop()
        for raw in lines:
            word, _, rest = raw.decode(errors="replace").partition(" ")
            if word == "pid":
                p.pid = int(rest)
            elif word == "exit":
                p.exit_code = None if rest == "None" else int(rest)
            elif word == "error":
                p.spawn_error = rest
                self.log.error("plugin cannot start", plugin=p.name, error=rest)

    def _read_output(self, p: _Plugin, stream: _OutputStream) -> None:
        try:
            chunk = os.read(stream.fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                self.log.warning("cannot read plugin output", plugin=p.name, error=str(exc))
            chunk = b""
        if not chunk:
            self._close_stream(p, stream)
            return
        self._emit(p, stream, stream.feed(chunk))
        if p.tokens < 1.0 and not stream.closed:
            # Over the limit: stop reading this pipe for a moment. The plugin's writes then
            # block in its own process; the daemon spends nothing on the flood.
            stream.paused_until = time.monotonic() + _PAUSE_WHEN_LIMITED
            self._selector.unregister(stream.fd)

    def _drain(self, p: _Plugin, stream: _OutputStream) -> None:
        """Read what is left in a pipe whose writers are gone (bounded), then close it."""
        for _ in range(64):
            if stream.closed:
                return
            try:
                chunk = os.read(stream.fd, _READ_CHUNK)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self._emit(p, stream, stream.feed(chunk))
        self._close_stream(p, stream)

    def _close_stream(self, p: _Plugin, stream: _OutputStream) -> None:
        if stream.closed:
            return
        self._emit(p, stream, stream.flush())
        if not stream.paused_until:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(stream.fd)
        stream.closed = True
        stream.paused_until = 0.0

    def _resume_streams(self, p: _Plugin, now: float) -> None:
        for stream in p.streams:
            if stream.paused_until and now >= stream.paused_until and not stream.closed:
                stream.paused_until = 0.0
                self._selector.register(stream.fd, selectors.EVENT_READ, (p, stream))

    def _emit(self, p: _Plugin, stream: _OutputStream, lines: list[bytes]) -> None:
        if not lines:
            return
        now = time.monotonic()
        rate = self.cfg.plugin_log_rate_limit
        p.tokens = min(rate * _BURST_FACTOR, p.tokens + (now - p.tokens_at) * rate)
        p.tokens_at = now
        log = self.log.info if stream.stream == "stdout" else self.log.warning
        allowed = min(len(lines), int(p.tokens))
        p.tokens -= allowed
        p.dropped += len(lines) - allowed
        for raw in lines[:allowed]:
            log(f"[{p.name}] {decode_line(raw)}", plugin=p.name, stream=stream.stream)
        self._report_drops(p, now)

    def _report_drops(self, p: _Plugin, now: float, force: bool = False) -> None:
        unreported = p.dropped - p.dropped_reported
        if unreported <= 0:
            return
        if force or now - p.dropped_reported_at >= _DROP_REPORT_INTERVAL:
            self.log.warning(
                "plugin output rate-limited; lines dropped",
                plugin=p.name,
                dropped=unreported,
                dropped_total=p.dropped,
                limit_per_second=self.cfg.plugin_log_rate_limit,
            )
            p.dropped_reported = p.dropped
            p.dropped_reported_at = now

    def _close_process_fds(self, p: _Plugin) -> None:
        if p.status_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(p.status_fd)
            with contextlib.suppress(OSError):
                os.close(p.status_fd)
            p.status_fd = None
        shim = p.shim
        if shim is not None:
            for pipe in (shim.stdout, shim.stderr):
                if pipe is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.unregister(pipe.fileno())
                    pipe.close()

    def _publish(self) -> None:
        self._snapshot = [p.snapshot() for p in sorted(self._plugins.values(), key=_by_name)]


def scrubbed_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """Return what of the daemon's environment a plugin may see.

    Removed: every ``LMCACHED_*`` and ``LMCACHE_*`` variable (config overrides, among them
    secrets such as a remote_url with a password and key-file paths; the plugin gets the redacted
    config in LMCACHE_PLUGIN_CONFIG instead) except ``LMCACHE_PLUGIN_*``,
    ``LMCACHE_RUNTIME_PLUGIN_*`` and ``LMCACHED_CONTROL_ENDPOINT``; and systemd's notify and
    socket-activation variables, so a plugin cannot speak to systemd for the daemon. Everything
    else passes (PATH, the locale, HOME, TMPDIR, the service's own variables): it is the
    environment the operator gave the service.
    """
    out = {}
    for name, value in environ.items():
        if name in _SYSTEMD_NAMES:
            continue
        if (
            name.startswith(_SCRUBBED_PREFIXES)
            and not name.startswith(_KEPT_PREFIXES)
            and name not in _KEPT_NAMES
        ):
            continue
        out[name] = value
    return out


def _by_name(p: _Plugin) -> str:
    return p.name


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


__all__ = ["PluginLauncher", "PluginPolicy", "PluginState", "decode_line"]
