"""The asyncio client: :class:`lmcached.client.Client`'s contract, awaitable.

::

    async with lmcached.aio.Client.from_config("lmcached.yaml") as client:
        await client.put([key], [value])
        [value] = await client.get([key])

Every method of the blocking client is a coroutine here, with the same arguments, results,
deadlines (``timeout=``) and errors; ``cluster_map`` and ``chunk_size`` are coroutines instead
of properties.

**Why threads, not zmq.asyncio.** Each call runs the blocking client's method on a small thread
pool owned by this object. The blocking client is where the wire contract lives: routing,
batching under the wire limits, the pipelined in-flight window, resends after a worker restart,
cluster-map refresh, CURVE, fork safety and the same-host data plane. A zmq.asyncio client
would be a second copy of all of it, and its sockets would be bound to the event loop that
created them. Here the loop thread only submits work and awaits a future, so it never blocks;
no socket or future outlives one call, so one Client serves any loop (several ``asyncio.run``
in a row, or a loop per thread); and libzmq does the waiting with the GIL released.

**Concurrency.** Up to ``max_concurrency`` calls run at once, each on its own blocking client
(a blocking client serialises its calls); more wait for a free one. A call's deadline counts
from when it was awaited, so time spent waiting for a free client is part of it.

**Cancellation.** Cancelling the awaiting task abandons the result, but a call already running
finishes in its thread (at the latest at its deadline) before its client is reused. Buffers
passed to ``put`` or ``get_into`` must stay untouched until the call returns, as with the
blocking client.

**Fork.** A child process that uses an inherited Client gets a fresh pool and fresh blocking
clients; the inherited ones are left alone.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lmcached.client.api import Client as BlockingClient
from lmcached.client.api import FlushReport
from lmcached.errors import LMCachedRequestError, LMCachedTimeout

__all__ = ["Client"]

T = TypeVar("T")

DEFAULT_MAX_CONCURRENCY = 4


class Client:
    """Store and fetch KV blocks in an lmcached daemon from asyncio code."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float | None = None,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **kw: Any,
    ) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int):
            raise ValueError(f"max_concurrency must be an integer, got {max_concurrency!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self._make: Callable[[], BlockingClient] = functools.partial(
            BlockingClient, endpoint, timeout, **kw
        )
        self.max_concurrency = max_concurrency
        # Built now, in the caller, so that bad arguments raise here and not at the first call.
        first = self._make()
        self._closed = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._idle: list[BlockingClient] = [first]
        self._clients: list[BlockingClient] = [first]
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str], timeout: float | None = None, **kw: Any
    ) -> Client:
        """Connect to the daemon started with the config file at ``path`` (see the blocking
        client's ``from_config``)."""
        return cls(None, timeout, config_path=path, **kw)

    # ------------------------------------------------------------------ public contract
    async def put(
        self,
        keys: Sequence[bytes],
        values: Sequence[Any],
        metas: Sequence[dict[str, Any] | None] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Store one block per key. Returns once every owning worker has it in memory."""
        await self._call(lambda c, t: c.put(keys, values, metas, timeout=t), timeout)

    async def get(self, keys: Sequence[bytes], timeout: float | None = None) -> list[Any | None]:
        """Return each block's bytes (a buffer the caller owns), or None where missing."""
        return await self._call(lambda c, t: c.get(keys, timeout=t), timeout)

    async def get_with_meta(
        self, keys: Sequence[bytes], timeout: float | None = None
    ) -> list[tuple[Any, dict[str, Any] | None] | None]:
        """Return (buffer, meta) for each found key, None where missing."""
        return await self._call(lambda c, t: c.get_with_meta(keys, timeout=t), timeout)

    async def get_into(
        self, keys: Sequence[bytes], buffers: Sequence[Any], timeout: float | None = None
    ) -> list[bool]:
        """Copy each found block into the caller's buffer of the same position; True where found."""
        return await self._call(lambda c, t: c.get_into(keys, buffers, timeout=t), timeout)

    async def lookup(self, keys: Sequence[bytes], timeout: float | None = None) -> int:
        """Return how many leading keys are present (the prefix hit)."""
        return await self._call(lambda c, t: c.lookup(keys, timeout=t), timeout)

    async def exists(self, keys: Sequence[bytes], timeout: float | None = None) -> list[bool]:
        """Return whether each key is present."""
        return await self._call(lambda c, t: c.exists(keys, timeout=t), timeout)

    async def delete(self, keys: Sequence[bytes], timeout: float | None = None) -> int:
        """Remove the keys from every tier; return how many were present."""
        return await self._call(lambda c, t: c.delete(keys, timeout=t), timeout)

    async def purge(self, prefix: bytes, timeout: float | None = None) -> int:
        """Remove every key starting with ``prefix`` from every tier; return how many."""
        return await self._call(lambda c, t: c.purge(prefix, timeout=t), timeout)

    async def flush(self, timeout: float | None = None) -> FlushReport:
        """Wait until the daemon's asynchronous tier writes are done; report lost copies
        (see :meth:`lmcached.client.Client.flush`).

        The daemon counts losses per connection, and this client's puts went through any of
        its pooled connections, so the flush asks through every one of them and adds up.
        """
        return await self._call(self._flush_each, timeout)

    def _flush_each(self, first: BlockingClient, timeout: float | None) -> FlushReport:
        deadline = time.monotonic() + (first.timeout if timeout is None else timeout)
        report = first.flush(timeout=timeout)  # the one that waits for the writes
        with self._lock:
            others = [c for c in self._clients if c is not first]
        dropped, failed, unconfirmed = report.dropped, report.failed, report.unconfirmed
        for client in others:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LMCachedTimeout("flush did not finish before its deadline")
            # A client busy with another call is waited for (its calls are serialised).
            more = client.flush(timeout=left)
            dropped, failed = dropped + more.dropped, failed + more.failed
            unconfirmed += more.unconfirmed
        return FlushReport(dropped=dropped, failed=failed, unconfirmed=unconfirmed)

    async def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Round-trip the scheduler; return its pid and map epoch."""
        return await self._call(lambda c, t: c.ping(timeout=t), timeout)

    async def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """Return the daemon's status: map epoch, and per worker its tiers' and ops' counters."""
        return await self._call(lambda c, t: c.stats(timeout=t), timeout)

    async def control(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send a control op (status, reload, shutdown ...) to the scheduler; return its reply."""
        return await self._call(lambda c, t: c.control(op, timeout=t, **fields), timeout)

    async def cluster_map(self) -> dict[str, Any]:
        """Return the cluster map (fetched on first use, within the default deadline)."""
        return await self._call(lambda c, _t: c.cluster_map, None)

    async def chunk_size(self) -> int:
        """Return the daemon's chunk size in tokens."""
        return await self._call(lambda c, _t: c.chunk_size, None)

    async def close(self) -> None:
        """Close every socket once running calls are done. Idempotent; safe after fork."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pid != os.getpid():
                return  # what this process inherited belongs to the parent
            executor, self._executor = self._executor, None
            clients, self._idle = self._clients, []
        await asyncio.to_thread(_close, executor, clients)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------- internals
    async def _call(
        self, method: Callable[[BlockingClient, float | None], T], timeout: float | None
    ) -> T:
        if self._closed:
            raise LMCachedRequestError("client is closed")
        submitted = time.monotonic()
        run = functools.partial(self._run, method, timeout, submitted)
        return await asyncio.get_running_loop().run_in_executor(self._pool(), run)

    def _run(
        self,
        method: Callable[[BlockingClient, float | None], T],
        timeout: float | None,
        submitted: float,
    ) -> T:
        """Run one call on a free blocking client (executor thread)."""
        client = self._take()
        try:
            total = client.timeout if timeout is None else timeout
            remaining: float | None = timeout
            if total > 0:  # a non-positive timeout goes through: the client names the error
                remaining = total - (time.monotonic() - submitted)
                if remaining <= 0:
                    raise LMCachedTimeout(
                        f"no connection was free within the call's {total} s deadline "
                        f"(max_concurrency is {self.max_concurrency})"
                    )
            return method(client, remaining)
        finally:
            self._give(client)

    def _pool(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():
            self._after_fork()
        with self._lock:
            if self._closed:
                raise LMCachedRequestError("client is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.max_concurrency, thread_name_prefix="lmcached-aio"
                )
            return self._executor

    def _after_fork(self) -> None:
        # The parent's lock may have been held at fork, and its threads do not exist here: start
        # over. The inherited blocking clients are the parent's; they are dropped, not closed.
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._executor = None
        self._idle = []
        self._clients = []

    def _take(self) -> BlockingClient:
        with self._lock:
            if self._closed:
                raise LMCachedRequestError("client is closed")
            if self._idle:
                return self._idle.pop()
        # At most max_concurrency threads ask at once, so at most that many clients exist.
        client = self._make()
        with self._lock:
            self._clients.append(client)
        return client

    def _give(self, client: BlockingClient) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(client)


def _close(executor: ThreadPoolExecutor | None, clients: list[BlockingClient]) -> None:
    # Calls already running finish first (each within its deadline); then the sockets go.
    if executor is not None:
        executor.shutdown(wait=True)
    for client in clients:
        client.close()
