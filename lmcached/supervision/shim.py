"""Run one plugin in its own process group, and take the whole group down when asked or orphaned.

The launcher starts one shim per plugin (``python shim.py '<json spec>'``); the shim starts the
plugin. Why a shim and not ``PR_SET_PDEATHSIG`` on the plugin alone: the death signal reaches only
the direct child (a bash plugin's ``sleep`` would survive), it fires when the spawning *thread*
exits, and setting it needs ``preexec_fn``, which is unsafe in the threaded daemon. The shim is
single-threaded, so it can use ``preexec_fn`` safely, and it:

- starts the plugin in a new session (its own process group), with the requested rlimits and a
  death signal (SIGKILL) tied to the shim, so that even a ``kill -9`` of the shim kills the plugin;
- becomes a child subreaper, so grandchildren that double-fork or call ``setsid`` are re-parented
  to it instead of to init, and it can still find and kill them;
- watches a *lifeline* pipe whose write end only the owning daemon process holds. EOF on it means
  the daemon is gone (even by ``kill -9``): the shim then stops the plugin's group;
- on SIGTERM (the launcher's stop), sends SIGTERM to the plugin's group and every descendant, and
  SIGKILL after ``stop_timeout``;
- when the plugin's main process exits by itself, stops what it left behind the same way;
- reports ``pid N``, ``error MESSAGE`` and ``exit RC`` lines on a status pipe, and exits only once
  no descendant is left, so "the shim has exited" means "nothing of this plugin runs".

This module imports only the standard library and psutil: it must start fast and never load the
daemon's code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from typing import Any

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# After SIGKILL, a process stuck in uninterruptible sleep may take a while to go; do not wait
# for it forever.
_KILL_GRACE = 5.0

_RLIMITS = {
    "memory": resource.RLIMIT_AS,
    "cpu_seconds": resource.RLIMIT_CPU,
    "open_files": resource.RLIMIT_NOFILE,
}

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _descendants() -> list[psutil.Process]:
    try:
        return [
            p
            for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE
        ]
    except psutil.Error:
        return []


def _signal_all(pgid: int, sig: int) -> None:
    """Send ``sig`` to the plugin's process group and to every other descendant of the shim.

    Each process gets the signal once: a second SIGTERM could land while a Python plugin is
    already exiting from the first, after its handler was reset, and kill it uncleanly.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for proc in _descendants():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) != pgid:  # left the group (setsid): reached only this way
                proc.send_signal(sig)


class Shim:
    """Supervise one plugin process tree on behalf of the launcher (see the module doc)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.argv: list[str] = spec["argv"]
        self.cwd: str | None = spec.get("cwd")
        self.stop_timeout = float(spec["stop_timeout"])
        self.rlimits: dict[str, int] = spec.get("rlimits") or {}
        self.lifeline_fd = int(spec["lifeline_fd"])
        self.status_fd = int(spec["status_fd"])
        self.stop_requested = False
        self.returncode: int | None = None

    # -- reporting ----------------------------------------------------------------------------

    def report(self, line: str) -> None:
        data = (line.replace("\n", " ") + "\n").encode()
        # OSError: the launcher is gone; the lifeline tells the loop to clean up.
        with contextlib.suppress(OSError):
            os.write(self.status_fd, data)

    # -- start --------------------------------------------------------------------------------

    def _preexec(self) -> None:
        # Runs in the forked child of this single-threaded shim, where preexec_fn is safe.
        # Ignored signals stay ignored across exec: give the plugin the default dispositions.
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        for name, value in self.rlimits.items():
            resource.setrlimit(_RLIMITS[name], (value, value))

    def start(self) -> subprocess.Popen[bytes] | None:
        try:
            proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=self._preexec,
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.report(f"error cannot start {self.argv[0]}: {detail}")
            return None
        self.report(f"pid {proc.pid}")
        return proc

    # -- the loop -----------------------------------------------------------------------------

    def _reap(self, plugin_pid: int) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == plugin_pid:
                self.returncode = os.waitstatus_to_exitcode(status)

    def run(self) -> int:
        # Not Linux >= 3.4: the process group still covers the usual cases.
        with contextlib.suppress(OSError):
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        # A Ctrl-C or hangup meant for the daemon's terminal is not a reason to stop on our own:
        # the daemon decides, through SIGTERM or the lifeline.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, lambda *_: None)

        proc = self.start()
        if proc is None:
            return 0
        pgid = proc.pid
        terminating = False
        term_deadline = kill_deadline = 0.0
        lifeline_open = True
        while True:
            self._reap(proc.pid)
            must_stop = self.stop_requested or not lifeline_open or self.returncode is not None
            if not terminating and must_stop:
                terminating = True
                _signal_all(pgid, signal.SIGTERM)
                # A stopped (SIGSTOP) process would never see SIGTERM otherwise.
                _signal_all(pgid, signal.SIGCONT)
                term_deadline = time.monotonic() + self.stop_timeout
                kill_deadline = term_deadline + _KILL_GRACE
            if terminating:
                if self.returncode is not None and not _descendants():
                    break
                now = time.monotonic()
                if now >= kill_deadline:
                    break
                if now >= term_deadline:
                    _signal_all(pgid, signal.SIGKILL)
            watch = [wake_r] + ([self.lifeline_fd] if lifeline_open else [])
            try:
                ready, _, _ = select.select(watch, [], [], 0.05 if terminating else 1.0)
            except InterruptedError:
                continue
            if wake_r in ready:
                try:
                    while os.read(wake_r, 512):
                        pass
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        raise
            if lifeline_open and self.lifeline_fd in ready:
                try:
                    data = os.read(self.lifeline_fd, 512)
                except OSError:
                    data = b""
                if not data:
                    lifeline_open = False
        self._reap(proc.pid)
        proc.returncode = self.returncode  # reaped by us; keep Popen from waiting again
        self.report(f"exit {self.returncode}")
        return 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: shim.py '<json spec>' (run by lmcached's PluginLauncher)", file=sys.stderr)
        return 2
    return Shim(json.loads(argv[1])).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
