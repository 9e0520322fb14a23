"""The client's resend policy, a value passed to the Client (as redis-py's ``Retry``).

Every call has a deadline. While a call waits, the client probes the cluster map every
``probe_interval`` seconds; when a worker it waits on was replaced (crash, daemon restart), it
reconnects and resends the unanswered requests, at most ``resends`` times per request, within
the same deadline. All ops are idempotent, so a resend is safe.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Retry"]


@dataclass(frozen=True, slots=True)
class Retry:
    """How often, and how patiently, a call resends after a worker changed under it."""

    # Resends per request within one call; 0 fails a call at the first worker change.
    resends: int = 1
    # Seconds without progress before the map is probed for replaced workers.
    probe_interval: float = 0.25
    # Deadline of one map probe: a scheduler that is down must not stall the call longer.
    map_timeout: float = 0.5
    # Pause between map polls while waiting for a replaced worker to come up.
    poll_interval: float = 0.05

    def __post_init__(self) -> None:
        if self.resends < 0:
            raise ValueError(f"resends must be >= 0, got {self.resends}")
        for name in ("probe_interval", "map_timeout", "poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
