"""End plugin descendants that outlived their shim, and reap them.

A shim is a child subreaper for its plugin's tree, so it finds every descendant, even one that
called ``setsid``. But a shim killed with ``kill -9`` cannot clean up: its plugin dies through
the death signal, and the rest of the tree is re-parented to the nearest subreaper. The process
that owns the launcher (the scheduler, each worker) is made that subreaper, so such orphans
become its direct children, where :class:`OrphanReaper` finds them by the owner tag every plugin
process inherits (:data:`OWNER_ENV`), kills them and reaps them.

The same holds one level up: when a worker dies, its shims are re-parented to the scheduler. They
stop their plugins on their own (their lifeline reached EOF); the scheduler only reaps them.

Only tagged processes are touched. The tag is an environment variable, so a plugin that clears
its environment before a ``setsid`` escapes this net; the systemd unit's cgroup
(KillMode=control-group) is the backstop for that, as for a kill of every lmcached process at
once.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable

import psutil

# Every plugin process (and its shim) carries the pid of the process that owns its launcher.
OWNER_ENV = "LMCACHED_PLUGIN_OWNER"
PR_SET_CHILD_SUBREAPER = 36
# A killed process normally goes at once; one in uninterruptible sleep may take a while.
_FORGET_AFTER_S = 60.0
_SHIM_MODULE = "shim.py"


def become_subreaper() -> bool:
    """Make this process the subreaper of its descendants; False where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class OrphanReaper:
    """Find tagged processes re-parented to this process; kill plugin leftovers, reap all."""

    def __init__(self, own_shims: Callable[[], set[int]]) -> None:
        self._own_shims = own_shims
        self._me = os.getpid()
        # pid -> when first seen: adopted processes this process must reap once they exit.
        self._adopted: dict[int, float] = {}
        self.killed = 0

    def sweep(self) -> int:
        """Kill adopted plugin processes (whole trees), reap what exited; return how many killed."""
        if os.getpid() != self._me:  # a forked child inherits nothing to reap
            return 0
        own = self._own_shims()
        killed = 0
        try:
            children = psutil.Process().children()
        except psutil.Error:
            children = []
        for child in children:
            if child.pid in own or child.pid in self._adopted:
                continue
            try:
                if child.environ().get(OWNER_ENV) is None:
                    continue  # not a plugin process: a worker, or another component's child
                is_shim = any(arg.endswith(_SHIM_MODULE) for arg in child.cmdline())
            except psutil.Error:
                continue  # gone already, or a zombie: nothing to kill
            self._adopted[child.pid] = time.monotonic()
            if is_shim:
                continue  # a dead worker's shim: it stops its own plugin, then we reap it
            killed += self._kill_tree(child)
        self.killed += killed
        self._reap()
        return killed

    def _kill_tree(self, root: psutil.Process) -> int:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = [root]
        count = 0
        for proc in tree:
            with contextlib.suppress(psutil.Error, OSError):
                proc.send_signal(signal.SIGKILL)
                count += 1
            # Its children come to us when it dies: remember them all for reaping.
            self._adopted.setdefault(proc.pid, time.monotonic())
        return count

    def _reap(self) -> None:
        now = time.monotonic()
        for pid, since in list(self._adopted.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                # Not (yet) ours: a grandchild whose parent we have not reaped. Keep it a while.
                done = pid if now - since > _FORGET_AFTER_S or not psutil.pid_exists(pid) else 0
            if done:
                del self._adopted[pid]

    @property
    def pending(self) -> int:
        """Adopted processes not reaped yet."""
        return len(self._adopted)
