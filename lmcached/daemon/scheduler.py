"""The scheduler process: control endpoint, cluster map and worker supervision.

It never touches KV bytes. Clients ask it once for the cluster map (epoch, worker endpoints,
chunk size, limits) and then talk to workers directly. It spawns ``num_workers`` worker
processes, restarts a crashed one with backoff and bumps the map epoch on every change, so a
client that sees a dead or changed worker knows to refresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from lmcached import config as config_mod
from lmcached import logs, protocol
from lmcached.errors import (
    EXIT_CONFIG_INVALID,
    EXIT_PLUGIN_FATAL,
    EXIT_WORKERS_CANNOT_START,
    StartupError,
)
from lmcached.protocol import (
    CONTROL_OPS,
    ClusterMap,
    ControlReply,
    ErrorReply,
    MapReply,
    MapRequest,
    PingReply,
    PingRequest,
    ProtocolError,
    ReloadReply,
    ReloadRequest,
    ShutdownReply,
    ShutdownRequest,
    StatsReply,
    StatsRequest,
    StatusReply,
    StatusRequest,
    WorkerEntry,
)
from lmcached.runtime import (
    InstanceLock,
    RuntimeDirError,
    bind_endpoints,
    host_id,
    instance_dir,
    remove_endpoints,
    write_endpoints,
)
from lmcached.security import secure_ipc_socket
from lmcached.shm.layout import retire_arena
from lmcached.supervision.states import (
    ProcessLife,
    ProcessState,
    RestartPolicy,
    worker_state_name,
)
from lmcached.version import PROTOCOL_VERSION, __version__

LOOP_MS = 100
PR_SET_PDEATHSIG = 1
# Loaded before any fork: the child between fork and exec may only call into what is loaded.
_libc = ctypes.CDLL(None, use_errno=True)
MAX_BACKOFF_S = 10.0
# A worker that stayed up this long is healthy again: its next crash restarts it quickly.
STABLE_AFTER_S = 30.0
STATUS_DEADLINE_S = 1.0


@dataclass
class WorkerSlot:
    """The scheduler's view of one worker id across its restarts."""

    id: int
    proc: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    last_exit: int | None = None
    sock: zmq.Socket | None = None  # scheduler -> worker, for stats and health
    # Starts in a row that ended before the worker served (reset once it serves).
    failed_starts: int = 0
    life: ProcessLife = field(init=False)

    def __post_init__(self) -> None:
        self.life = ProcessLife(f"worker {self.id}")

    @property
    def state(self) -> str:
        """The worker's state as the cluster map and `status` publish it ("up" when serving)."""
        return worker_state_name(self.life.state)

    @property
    def serving(self) -> bool:
        return self.life.state is ProcessState.RUNNING

    @property
    def restarts(self) -> int:
        return self.life.restarts


@dataclass
class PendingStatus:
    """A control request waiting for every worker's stats reply (or its deadline)."""

    envelope: Any
    rid: int
    deadline: float
    waiting: dict[int, int]  # worker id -> request id sent to it
    replies: dict[int, StatsReply | ErrorReply] = field(default_factory=dict)
    finish: Callable[[PendingStatus], None] | None = None


class Scheduler:
    """Own the control endpoint, the cluster map and the worker processes."""

    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        self.log = logs.get_logger("lmcached.daemon.scheduler")
        self.daemon_id = secrets.token_hex(8)
        self.epoch = 0
        self.slots = [WorkerSlot(i) for i in range(cfg.num_workers)]
        # A worker counts as started once it stayed up STABLE_AFTER_S; until then each crash
        # doubles its restart delay.
        self.restart_policy = RestartPolicy(
            grace=STABLE_AFTER_S, backoff=cfg.worker_restart_backoff, backoff_cap=MAX_BACKOFF_S
        )
        self.lock = InstanceLock(cfg)
        self._ctx = zmq.Context(io_threads=1)
        self._control: zmq.Socket | None = None
        self._internal: zmq.Socket | None = None
        self.control_endpoints: dict[str, str] = {}
        self._internal_endpoint = ""
        self._config_json = instance_dir(cfg) / "config.json"
        self._stopping = False
        self._stop_signal: int | None = None  # the signal that asked to stop, logged by serve()
        self.exit_code = 0
        self._reload_requested = False
        self._ready = False
        self._next_rid = 1
        self._pending: list[PendingStatus] = []
        self._closed = False
        self.started_at = time.time()
        # Hooks other subsystems attach to (plugins, metrics, sd_notify); called on the loop.
        self.on_ready: list[Callable[[], None]] = []
        self.on_tick: list[Callable[[], None]] = []
        self.on_reload: list[Callable[[], dict[str, Any]]] = []
        self.on_stopping: list[Callable[[], None]] = []
        self.status_extras: list[Callable[[], dict[str, Any]]] = []
        # Fields other subsystems publish in endpoints.json (e.g. the metrics URL). Written with
        # the control endpoints in one atomic write, so a reader never sees a partial file.
        self.endpoint_extras: dict[str, Any] = {}
        # Set by lmcached.daemon.service when CURVE is configured: guards our server sockets and
        # authenticates us to the workers.
        self.auth: Any = None
        self.worker_curve: Any = None

    @property
    def zmq_context(self) -> zmq.Context:
        return self._ctx

    @property
    def ready(self) -> bool:
        """True once every worker has served at least once."""
        return self._ready

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ------------------------------------------------------------------------------ set-up
    def start(self) -> None:
        """Take the instance lock, bind the endpoints and spawn the workers."""
        cfg = self.cfg
        try:
            self.lock.acquire()
        except (RuntimeDirError, OSError) as exc:
            raise StartupError(f"cannot use the runtime folder: {exc}") from None
        # Owned (closed by shutdown()) before binding: a failed bind must not leave a socket
        # open, or the context's term() would wait for it for ever.
        control = self._control = self._ctx.socket(zmq.ROUTER)
        control.setsockopt(zmq.LINGER, 0)
        control.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        if self.auth is not None:
            self.auth.secure(control)
        port = cfg.port if cfg.enable_tcp else None
        try:
            self.control_endpoints = bind_endpoints(control, cfg, "control", port)
        except (zmq.ZMQError, OSError) as exc:
            where = f"tcp://{cfg.host}:{port}" if port else "its ipc socket"
            raise StartupError(f"cannot bind the control endpoint {where}: {exc}") from None
        secure_ipc_socket(self.control_endpoints["ipc"], cfg.socket_group)

        internal = self._internal = self._ctx.socket(zmq.ROUTER)
        internal.setsockopt(zmq.LINGER, 0)
        internal.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        try:
            self._internal_endpoint = bind_endpoints(internal, cfg, "internal", None)["ipc"]
        except (zmq.ZMQError, OSError) as exc:
            raise StartupError(f"cannot bind the internal ipc socket: {exc}") from None
        os.chmod(self._internal_endpoint[len("ipc://") :], 0o600)
        # Published at once (ready: false), so `status` and `stop` find a daemon whose workers
        # are still starting, or failing to, instead of reporting it "not running".
        self._publish_endpoints()

        # Workers read the effective config (env overrides applied) from a private file.
        effective = cfg.to_dict(redact=False)
        effective["instance_name"] = cfg.effective_instance_name
        effective["runtime_dir"] = cfg.effective_runtime_dir
        tmp = self._config_json.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(effective, f)
        os.replace(tmp, self._config_json)
        for slot in self.slots:
            self._spawn(slot)
        self.log.info(
            "scheduler_started",
            control=self.control_endpoints,
            workers=cfg.num_workers,
            version=__version__,
        )

    def _spawn(self, slot: WorkerSlot) -> None:
        cmd = [
            sys.executable,
            "-m",
            "lmcached.daemon.worker",
            "--config-json",
            str(self._config_json),
            "--worker-id",
            str(slot.id),
            "--internal",
            self._internal_endpoint,
            "--daemon-id",
            self.daemon_id,
            "--parent-pid",
            str(os.getpid()),
        ]
        with contextlib.suppress(FileNotFoundError):
            self._start_error_file(slot.id).unlink()
        slot.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, close_fds=True, preexec_fn=_die_with_parent(os.getpid())
        )
        slot.pid = slot.proc.pid
        slot.life.advance(ProcessState.STARTING)
        self.log.info("worker_spawned", worker=slot.id, pid=slot.pid)

    # ---------------------------------------------------------------------------- the map
    def cluster_map(self) -> ClusterMap:
        return ClusterMap(
            daemon_id=self.daemon_id,
            epoch=self.epoch,
            version=__version__,
            protocol=PROTOCOL_VERSION,
            host_id=host_id(),
            chunk_size=self.cfg.chunk_size,
            num_workers=self.cfg.num_workers,
            checksums=config_mod.needs_checksums(self.cfg),
            limits=config_mod.wire_limits(self.cfg),
            workers=[
                WorkerEntry(
                    id=s.id,
                    state=s.state,
                    pid=s.pid,
                    restarts=s.restarts,
                    tcp=s.endpoints.get("tcp"),
                    ipc=s.endpoints.get("ipc"),
                    arena=s.endpoints.get("arena"),
                )
                for s in self.slots
            ],
        )

    def _bump(self, reason: str, worker: int) -> None:
        self.epoch += 1
        self.log.info("map_epoch", epoch=self.epoch, reason=reason, worker=worker)

    # ------------------------------------------------------------------------- supervision
    def _supervise(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.proc
            state = slot.life.state
            if proc is not None and state in (ProcessState.STARTING, ProcessState.RUNNING):
                code = proc.poll()
                if code is not None:
                    self._worker_died(slot, code, now)
                elif (
                    state is ProcessState.STARTING
                    and now - slot.life.started_at > self.cfg.worker_start_timeout
                ):
                    self.log.error("worker_start_timeout", worker=slot.id, pid=slot.pid)
                    proc.kill()
                    proc.wait()
                    self._worker_died(slot, -9, now)
            if slot.life.due(now) and not self._stopping:
                slot.life.restarts += 1
                self._spawn(slot)

    def _start_error_file(self, worker: int) -> Path:
        return instance_dir(self.cfg) / f"worker-{worker}.start-error"

    def _worker_died(self, slot: WorkerSlot, code: int, now: float) -> None:
        was_up = slot.serving
        if not was_up:
            slot.failed_starts += 1
        slot.last_exit = code
        slot.proc = None
        slot.pid = None
        arena = slot.endpoints.get("arena")
        if arena is not None:
            # Clients still map its arena: its presence index must stop answering lookups.
            retire_arena(arena)
        slot.endpoints = {}
        if slot.sock is not None:
            slot.sock.close(linger=0)
            slot.sock = None
        delay = slot.life.exited(now, self.restart_policy)
        assert delay is not None  # workers have no retry limit
        if code == EXIT_PLUGIN_FATAL:
            # A plugin failed on_startup under strict_plugins: restarting will not help.
            self.log.error("worker_plugin_fatal", worker=slot.id, hint="see the worker's log")
            self.exit_code = code
            self._stopping = True
        elif code == EXIT_CONFIG_INVALID:
            # The worker logged why its store cannot be built from this config; so would any.
            check = "lmcached config check" + (
                f" --config {self.cfg.source}" if self.cfg.source else ""
            )
            self.log.error(
                "worker_config_invalid",
                worker=slot.id,
                hint=f"worker {slot.id} refused the config (see its config_invalid line); "
                f"run `{check}`",
            )
            self.exit_code = code
            self._stopping = True
        elif slot.failed_starts >= self.cfg.worker_start_attempts:
            self._give_up(slot, code)
        slot.life.advance(ProcessState.BACKOFF)
        self.log.error("worker_exited", worker=slot.id, code=code, restart_in_s=round(delay, 3))
        if was_up:
            self._bump("worker_down", slot.id)

    def _give_up(self, slot: WorkerSlot, code: int) -> None:
        """Stop the daemon: this worker cannot start, and neither would it on the next try."""
        reason = f"exit code {code}"
        with contextlib.suppress(OSError):
            text = self._start_error_file(slot.id).read_text(errors="replace").strip()
            if text:
                reason = text.splitlines()[0]
        message = (
            f"worker {slot.id} failed to start {slot.failed_starts} times in a row "
            f"(worker_start_attempts); last: {reason}"
        )
        self.log.error("workers_cannot_start", worker=slot.id, reason=reason)
        print(f"lmcached: {message}", file=sys.stderr, flush=True)
        self.exit_code = EXIT_WORKERS_CANNOT_START
        self._stopping = True

    def _on_hello(self, data: bytes) -> None:
        try:
            hello = protocol.decode_hello(data)
        except ProtocolError as exc:
            self.log.warning("bad_hello", error=exc.message)
            return
        wid, pid = hello.worker_id, hello.pid
        if not 0 <= wid < len(self.slots):
            self.log.warning("bad_hello", error=f"no worker id {wid}")
            return
        slot = self.slots[wid]
        if slot.pid != pid or slot.life.state is not ProcessState.STARTING:
            self.log.warning("stale_hello", worker=wid, pid=pid, expected=slot.pid)
            return
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.worker_curve is not None:
            self.worker_curve.apply(sock)
        try:
            sock.connect(hello.endpoints["ipc"])
        except (KeyError, zmq.ZMQError) as exc:
            # Closed at once: a socket left open would block the context's term() at shutdown.
            sock.close(linger=0)
            self.log.warning("bad_hello", worker=wid, error=f"no usable ipc endpoint: {exc}")
            return
        slot.endpoints = dict(hello.endpoints)
        slot.failed_starts = 0
        slot.life.advance(ProcessState.RUNNING)
        slot.sock = sock
        self._bump("worker_up", wid)
        if not self._ready and all(s.serving for s in self.slots):
            self._become_ready()

    def _publish_endpoints(self) -> None:
        write_endpoints(
            self.cfg,
            {
                "pid": os.getpid(),
                "daemon_id": self.daemon_id,
                "ready": self._ready,
                "control": self.control_endpoints,
                "version": __version__,
                "started_at": self.started_at,
                **self.endpoint_extras,
            },
        )

    def _become_ready(self) -> None:
        self._ready = True
        self._publish_endpoints()
        control = self.control_endpoints.get("tcp") or self.control_endpoints["ipc"]
        self.log.info("daemon_ready", control=control, workers=len(self.slots))
        print(f"lmcached ready: control {control} ({len(self.slots)} workers)", flush=True)
        for hook in self.on_ready:
            hook()

    # --------------------------------------------------------------------------- control
    def _handle_control(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return
        envelope = frames[0]
        assert self._control is not None
        limits = config_mod.wire_limits(self.cfg)
        reply: ControlReply | ErrorReply
        try:
            req = protocol.decode_request(frames[1], frames[2:], limits, CONTROL_OPS)
        except ProtocolError as exc:
            reply = ErrorReply(exc.code, exc.message)
            self._control.send_multipart([envelope, protocol.encode_reply(reply)])
            return
        if isinstance(req, MapRequest):
            reply = MapReply(self.cluster_map(), id=req.id)
        elif isinstance(req, PingRequest):
            reply = PingReply(os.getpid(), self.epoch, self._ready, id=req.id)
        elif isinstance(req, ShutdownRequest):
            self._stopping = True
            reply = ShutdownReply(True, id=req.id)
        elif isinstance(req, ReloadRequest):
            results: dict[str, Any] = {}
            for hook in self.on_reload:
                results.update(hook())
            reply = ReloadReply(results, id=req.id)
        elif isinstance(req, StatusRequest):
            self.request_worker_stats(envelope, req.id, self._finish_status)
            return
        else:  # pragma: no cover - CONTROL_OPS is checked by decode_request
            reply = ErrorReply(protocol.E_UNKNOWN_OP, req.op, id=req.id)
        self._control.send_multipart([envelope, protocol.encode_reply(reply)])

    def request_worker_stats(
        self,
        envelope: Any,
        rid: int,
        finish: Callable[[PendingStatus], None],
        deadline_s: float = STATUS_DEADLINE_S,
    ) -> None:
        """Ask every live worker for its stats; ``finish`` runs when all answered or at the deadline."""
        pending = PendingStatus(envelope, rid, time.monotonic() + deadline_s, {}, finish=finish)
        for slot in self.slots:
            if slot.serving and slot.sock is not None:
                wrid = self._next_rid
                self._next_rid += 1
                with contextlib.suppress(zmq.ZMQError):
                    slot.sock.send(protocol.encode_request(StatsRequest(id=wrid)), zmq.NOBLOCK)
                    pending.waiting[slot.id] = wrid
        self._pending.append(pending)
        self._check_pending()

    def _on_worker_reply(self, slot: WorkerSlot, data: bytes) -> None:
        try:
            reply = protocol.decode_stats_reply(data)
        except ProtocolError:
            return
        rid = reply.id
        for pending in self._pending:
            if pending.waiting.get(slot.id) == rid:
                del pending.waiting[slot.id]
                pending.replies[slot.id] = reply
        self._check_pending()

    def _check_pending(self) -> None:
        now = time.monotonic()
        still = []
        for pending in self._pending:
            if pending.waiting and now < pending.deadline:
                still.append(pending)
            elif pending.finish is not None:
                pending.finish(pending)
        self._pending = still

    def _finish_status(self, pending: PendingStatus) -> None:
        assert self._control is not None
        reply = StatusReply(self.status_snapshot(pending), id=pending.rid)
        self._control.send_multipart([pending.envelope, protocol.encode_reply(reply)])

    def status_snapshot(self, pending: PendingStatus) -> dict[str, Any]:
        """Combine the map, the workers' stats and process facts into one status document."""
        workers = []
        for slot in self.slots:
            stats = pending.replies.get(slot.id)
            entry: dict[str, Any] = {
                "id": slot.id,
                "pid": slot.pid,
                "state": slot.state,
                "restarts": slot.restarts,
                "last_exit": slot.last_exit,
                "responsive": isinstance(stats, StatsReply),
            }
            if isinstance(stats, StatsReply):
                entry["stats"] = stats.stats
            entry["memory"] = _memory(slot.pid)
            workers.append(entry)
        doc: dict[str, Any] = {
            "daemon_id": self.daemon_id,
            "pid": os.getpid(),
            "version": __version__,
            "epoch": self.epoch,
            "ready": self._ready,
            "uptime_s": round(time.time() - self.started_at, 3),
            "control": self.control_endpoints,
            "scheduler_memory": _memory(os.getpid()),
            "workers": workers,
        }
        for extra in self.status_extras:
            doc.update(extra())
        return doc

    # ------------------------------------------------------------------------------ loop
    def install_signal_handlers(self) -> None:
        # A handler only sets flags. It runs between two bytecodes of the main thread, maybe
        # inside the logger's write (structlog's PrintLogger holds a plain Lock there): a
        # handler that logged would wait for that lock forever.
        def stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signum
            self._stopping = True

        def reload(_signum: int, _frame: Any) -> None:
            self._reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def serve(self) -> None:
        assert self._control is not None and self._internal is not None
        while not self._stopping:
            poller = zmq.Poller()
            poller.register(self._control, zmq.POLLIN)
            poller.register(self._internal, zmq.POLLIN)
            socks = {s.sock: s for s in self.slots if s.sock is not None}
            for sock in socks:
                poller.register(sock, zmq.POLLIN)
            try:
                events = dict(poller.poll(LOOP_MS))
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ETERM, errno.EINTR):
                    continue
                raise
            if self._internal in events:
                while True:
                    try:
                        frames = self._internal.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_hello(frames[-1])
            for sock, slot in socks.items():
                if sock in events:
                    while True:
                        try:
                            data = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_worker_reply(slot, data)
            if self._control in events:
                for _ in range(256):
                    try:
                        frames = self._control.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle_control(frames)
            self._supervise()
            self._check_pending()
            if self._reload_requested:
                self._reload_requested = False
                for reload_hook in self.on_reload:
                    reload_hook()
            for tick_hook in self.on_tick:
                tick_hook()
        if self._stop_signal is not None:
            self.log.info("signal", signal=signal.Signals(self._stop_signal).name)

    def shutdown(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after shutdown_timeout) and clean up."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self.log.info("scheduler_stopping")
        for hook in self.on_stopping:
            try:
                hook()
            except Exception:
                self.log.exception("stopping_hook_failed")
        owns_instance = self.lock.held
        if owns_instance:
            remove_endpoints(self.cfg)
        procs = [s.proc for s in self.slots if s.proc is not None]
        for slot in self.slots:
            if slot.life.state in (ProcessState.STARTING, ProcessState.RUNNING):
                slot.life.advance(ProcessState.STOPPING)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        # Workers stop their plugins first (SIGTERM, SIGKILL after plugin_stop_timeout), and
        # workers with disk or remote tiers drain their write queues, for at most
        # shutdown_flush_timeout, so they get that much longer before SIGKILL.
        grace = max(self.cfg.shutdown_timeout, self.cfg.plugin_stop_timeout + 2.0)
        if config_mod.needs_checksums(self.cfg):
            grace += self.cfg.shutdown_flush_timeout
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker_kill", pid=proc.pid)
                proc.kill()
                proc.wait()
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close(linger=0)
                slot.sock = None
            slot.proc = None
            if slot.life.state is not ProcessState.STOPPED:
                slot.life.advance(ProcessState.STOPPED)
        for sock in (self._control, self._internal):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()
        if owns_instance:
            # Only the daemon holding the lock may remove the instance's files.
            for name in ("control", "internal"):
                with contextlib.suppress(OSError):
                    os.unlink(instance_dir(self.cfg) / f"{name}.sock")
            for slot in self.slots:
                with contextlib.suppress(OSError):
                    self._start_error_file(slot.id).unlink()
            with contextlib.suppress(OSError):
                Path(self._config_json).unlink()
        self.lock.release()
        self.log.info("scheduler_stopped")


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Return the worker's preexec_fn: between fork and exec, before any code of ours runs in
    it, ask the kernel for SIGTERM when the scheduler dies (the worker then stops its plugins
    and drains its write queues, as on any stop), then make sure it has not died already.

    The death signal fires when the forking *thread* ends; workers are spawned from the
    scheduler's main thread, whose end is the process's. Only async-signal-safe calls here.
    """

    def preexec() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the scheduler died before the death signal was armed
            os._exit(1)

    return preexec


def _memory(pid: int | None) -> dict[str, int] | None:
    """Return rss and uss (unique set size) of a process, or None when it is gone."""
    if pid is None:
        return None
    try:
        import psutil

        info = psutil.Process(pid).memory_full_info()
        return {"rss": info.rss, "uss": info.uss}
    except Exception:
        return None
