"""The life of every supervised process (workers and script plugins alike), as Supervisor has it.

- STOPPED: not running, as asked (or not started yet).
- STARTING: spawned; not yet a success (see :class:`RestartPolicy`'s ``grace``).
- RUNNING: started successfully (a plugin: alive for ``grace`` seconds; a worker: it said hello).
- BACKOFF: exited and waiting to be restarted; the delay doubles with each fast failure.
- STOPPING: asked to stop; killed if it does not stop in time.
- EXITED: exited and not restarted (a plugin whose restart policy says so).
- FATAL: could not be started, or failed fast more than ``max_retries`` times in a row.

:class:`ProcessLife` holds one process's state and is the one place that changes it
(:meth:`ProcessLife.advance`, which refuses a transition outside :data:`TRANSITIONS`);
:meth:`ProcessLife.exited` applies a :class:`RestartPolicy` to decide how long to back off.
Workers publish their state in the cluster map and ``status`` under the names clients know
(:data:`WORKER_STATE_NAMES`: ``"up"`` for RUNNING); plugins publish the state's own name.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass


class ProcessState(str, enum.Enum):
    """Supervisor's process states."""

    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


S = ProcessState
# Every transition a supervisor may make; anything else is a bug and raises.
TRANSITIONS: dict[ProcessState, frozenset[ProcessState]] = {
    S.STOPPED: frozenset({S.STARTING, S.FATAL}),
    S.STARTING: frozenset({S.RUNNING, S.BACKOFF, S.EXITED, S.FATAL, S.STOPPING}),
    S.RUNNING: frozenset({S.BACKOFF, S.EXITED, S.FATAL, S.STOPPING}),
    S.BACKOFF: frozenset({S.STARTING, S.FATAL, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.EXITED: frozenset({S.STARTING, S.FATAL, S.STOPPED}),
    S.FATAL: frozenset({S.STARTING, S.FATAL, S.STOPPED}),  # FATAL again: a retry that failed
}

# The names a worker's state has in the cluster map and `status`: clients test for "up".
WORKER_STATE_NAMES: dict[ProcessState, str] = {
    S.STOPPED: "stopped",
    S.STARTING: "starting",
    S.RUNNING: "up",
    S.BACKOFF: "backoff",
    S.STOPPING: "stopping",
    S.EXITED: "exited",
    S.FATAL: "fatal",
}

# A serving worker's published state (clients compare against this word).
WORKER_UP = WORKER_STATE_NAMES[S.RUNNING]


class IllegalTransition(RuntimeError):
    """A supervisor tried a state change outside TRANSITIONS (a bug in the supervisor)."""


@dataclass(frozen=True)
class RestartPolicy:
    """How a process that exited comes back.

    ``grace``: seconds a process must live before its start counts as a success; an exit sooner
    (or while still STARTING) is a *fast failure*. ``backoff``: the delay before the first
    restart, doubling with each fast failure in a row up to ``backoff_cap``; an exit after a
    successful start restarts after ``backoff`` again. ``max_retries``: fast failures in a row
    after which the process is FATAL (None: retry forever).
    """

    grace: float
    backoff: float
    backoff_cap: float
    max_retries: int | None = None

    def delay(self, fast_failures: int) -> float:
        """Return the backoff before the next start after ``fast_failures`` in a row."""
        return min(self.backoff_cap, self.backoff * 2 ** max(0, fast_failures - 1))


class ProcessLife:
    """One supervised process's state, when it entered it, and its failure counts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = ProcessState.STOPPED
        self.since = time.time()  # wall clock: published
        self.started_at = 0.0  # monotonic: when it last entered STARTING
        self.fast_failures = 0  # consecutive exits before the start counted as a success
        self.restarts = 0
        self.retry_at = 0.0  # monotonic: when BACKOFF ends

    def advance(self, new: ProcessState, now: float | None = None) -> ProcessState:
        """Move to ``new`` and return the state left; raise IllegalTransition if not allowed."""
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{self.name}: illegal transition {old.value}->{new.value}")
        self.state, self.since = new, time.time()
        if new is ProcessState.STARTING:
            self.started_at = time.monotonic() if now is None else now
        return old

    def succeeded(self, now: float, policy: RestartPolicy) -> bool:
        """Return True when a STARTING process has lived through the grace period."""
        return self.state is ProcessState.STARTING and now - self.started_at >= policy.grace

    def exited(self, now: float, policy: RestartPolicy) -> float | None:
        """Count an exit that will be restarted; return the backoff, or None when FATAL is due.

        Sets :attr:`retry_at`; the caller then advances to BACKOFF (or FATAL on None).
        """
        fast = self.state is ProcessState.STARTING or now - self.started_at < policy.grace
        self.fast_failures = self.fast_failures + 1 if fast else 0
        if policy.max_retries is not None and self.fast_failures > policy.max_retries:
            return None
        delay = policy.delay(self.fast_failures)
        self.retry_at = now + delay
        return delay

    def due(self, now: float) -> bool:
        """Return True when a process in BACKOFF may be started again."""
        return self.state is ProcessState.BACKOFF and now >= self.retry_at


def worker_state_name(state: ProcessState) -> str:
    """Return the name a worker's state has in the cluster map and `status`."""
    return WORKER_STATE_NAMES[state]


__all__ = [
    "TRANSITIONS",
    "WORKER_STATE_NAMES",
    "WORKER_UP",
    "IllegalTransition",
    "ProcessLife",
    "ProcessState",
    "RestartPolicy",
    "worker_state_name",
]
