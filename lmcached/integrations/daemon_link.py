"""A connection to the lmcached daemon that never raises and never waits on a dead daemon twice.

An inference engine must keep serving when its cache is down: every call here returns a safe
answer (no hit, not found, not stored) instead of raising. After a failure the link is *down*
for ``retry_interval`` seconds, during which calls answer at once without touching the
network; the next call after that tries again, so hits resume by themselves when the daemon
comes back. Warnings are rate-limited, so that an outage logs a line every
``warn_interval`` seconds, not one per request.

One link per thread: it owns one :class:`lmcached.client.Client`, which is not shared.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from lmcached.errors import LMCachedError, LMCachedRequestError

ClientFactory = Callable[[], Any]

# The Client method that lists the shared-memory arenas a same-host client maps (each a
# buffer-like object), for registering them with CUDA.
ARENAS_METHOD = "shared_arenas"


class RateLimitedLog:
    """Log a warning at most once per ``interval`` seconds for each kind of message."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self.suppressed.pop(kind, 0)
        suffix = f" ({skipped} similar warnings suppressed)" if skipped else ""
        self.logger.warning(message + suffix, *args)


class DaemonLink:
    """Daemon calls that degrade to misses while the daemon is unreachable.

    ``make_client`` builds the client (called lazily, again after a failure to build it);
    ``timeout`` bounds every call in seconds.
    """

    def __init__(
        self,
        make_client: ClientFactory,
        logger: logging.Logger,
        timeout: float,
        retry_interval: float = 5.0,
        warn_interval: float = 30.0,
    ) -> None:
        self._make_client = make_client
        self.timeout = timeout
        self._client: Any = None
        self._down_until = 0.0
        self.retry_interval = retry_interval
        self.log = RateLimitedLog(logger, warn_interval)
        self.failures = 0

    @property
    def is_down(self) -> bool:
        """Whether calls are being skipped after a recent failure."""
        return time.monotonic() < self._down_until

    def down_for(self) -> float:
        """Seconds left before calls try the daemon again (0 when it is not marked down)."""
        return max(0.0, self._down_until - time.monotonic())

    def _call(self, what: str, fn: Callable[[Any], Any], default: Any) -> Any:
        if self.is_down:
            return default
        try:
            if self._client is None:
                self._client = self._make_client()
            return fn(self._client)
        except LMCachedRequestError as exc:
            # Our bug or a limit, not an outage: say so, but keep the daemon marked up.
            self.failures += 1
            self.log.warning(f"rejected:{what}", "lmcached rejected %s: %s", what, exc)
            return default
        except (LMCachedError, OSError) as exc:
            self.failures += 1
            self._down_until = time.monotonic() + self.retry_interval
            # A fresh client next time: this one may hold a request that will never be answered.
            self.close()
            self.log.warning(
                "down",
                "lmcached unreachable (%s failed: %s); serving without the cache, "
                "retrying in %.0fs",
                what,
                exc,
                self.retry_interval,
            )
            return default

    def chunk_size(self) -> int | None:
        """Return the daemon map's chunk size, or None if the daemon cannot be reached."""
        return self._call("map", lambda c: int(c.chunk_size), None)

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Return how many leading keys the daemon holds (0 when it is down)."""
        if not keys:
            return 0
        return int(self._call("lookup", lambda c: c.lookup(list(keys), timeout=self.timeout), 0))

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Return which keys the daemon holds (none when it is down)."""
        if not keys:
            return []
        return list(
            self._call(
                "exists", lambda c: c.exists(list(keys), timeout=self.timeout), [False] * len(keys)
            )
        )

    def get(self, keys: Sequence[bytes]) -> list[Any]:
        """Return each key's block as a bytes-like view, or None (all None when down)."""
        if not keys:
            return []
        return list(
            self._call("get", lambda c: c.get(list(keys), timeout=self.timeout), [None] * len(keys))
        )

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[Any]) -> list[bool]:
        """Copy found blocks into ``buffers``; return which were found (none when down)."""
        if not keys:
            return []
        return list(
            self._call(
                "get",
                lambda c: c.get_into(list(keys), list(buffers), timeout=self.timeout),
                [False] * len(keys),
            )
        )

    @staticmethod
    def lost(values: Sequence[Any]) -> list[int]:
        """Return the indexes of ``values`` (from :meth:`get`) whose slot was reused under them.

        A same-host get returns views of the worker's arena, each held by a lease. A lease
        that ran out (a load stalled past ``lease_timeout``) lets the worker reuse the slot, so
        bytes read from the view may belong to another block. Call this after the reads are
        complete (on a GPU: after the copies' stream is synchronized): whatever it does not
        name was read whole, before any reuse.
        """
        from lmcached.client.shared import check_view
        from lmcached.errors import LMCachedLeaseExpired

        lost = []
        for i, value in enumerate(values):
            try:
                check_view(value)
            except LMCachedLeaseExpired:
                lost.append(i)
        return lost

    def arenas(self) -> list[Any]:
        """Return the daemon's shared-memory arenas this client maps (buffer-like), if any.

        A same-host client of the shared-memory data plane maps them; other clients have none.
        """

        def mapped(client: Any) -> list[Any]:
            method = getattr(client, ARENAS_METHOD, None)
            if not callable(method):
                return []
            # Client.shared_arenas() gives (worker id, read-only view, size) per mapped arena.
            return [entry[1] if isinstance(entry, tuple) else entry for entry in method()]

        return list(self._call("arenas", mapped, []))

    def put(self, keys: Sequence[bytes], values: Sequence[Any]) -> bool:
        """Store blocks; return whether the daemon acknowledged them."""
        if not keys:
            return True

        def do_put(client: Any) -> bool:
            client.put(list(keys), list(values), timeout=self.timeout)
            return True

        return bool(self._call("put", do_put, False))

    def close(self) -> None:
        """Close the client. Idempotent."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(LMCachedError, OSError):
                client.close()
