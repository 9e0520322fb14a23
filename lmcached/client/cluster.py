"""The client's view of the cluster: the map, key routing, worker incarnations, the control socket.

The client asks the scheduler for the cluster map (:class:`~lmcached.protocol.ClusterMap`) once,
then sends each key straight to the worker that owns it (jump hash of xxh3-64, see
:mod:`lmcached.routing`). Every refresh reconnects to the workers whose incarnation (daemon id,
pid) or endpoint changed, so requests never reach a replaced worker's queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from typing import cast

import zmq

from lmcached import protocol, routing
from lmcached.client.connection import Connections, Socket
from lmcached.client.retry import Retry
from lmcached.errors import LMCachedRequestError, LMCachedTimeout, LMCachedUnavailable
from lmcached.protocol import (
    ClusterMap,
    ControlReply,
    ControlRequest,
    ErrorReply,
    Limits,
    MapReply,
    MapRequest,
    ProtocolError,
)
from lmcached.runtime import host_id

__all__ = ["ClusterView"]

# Most keys whose owner a client remembers; past it the memory starts again empty.
OWNER_CACHE_KEYS = 1 << 16


class ClusterView:
    """The map, the routing and the control socket of one client."""

    def __init__(
        self,
        conns: Connections,
        locate: Callable[[], str],
        *,
        follows_file: bool,
        transport: str,
        retry: Retry,
        ids: Iterator[int],
    ) -> None:
        self._conns = conns
        # Returns the scheduler's control endpoint; with ``follows_file`` it reads the daemon's
        # runtime file, which a restarted daemon rewrites with its new ports.
        self._locate = locate
        self._follows_file = follows_file
        self._transport = transport
        self._retry = retry
        self._ids = ids
        self._map: ClusterMap | None = None
        self._control: Socket | None = None
        self._control_ep: str | None = None
        # Called after every map refresh with (map, same host): the shared-memory path maps
        # new arenas there (a restarted worker's), in step with the sockets.
        self.on_sync: Callable[[ClusterMap, bool], None] | None = None
        # key -> owner for the current worker count: an engine asks about the same prompts'
        # keys again and again, and a dict lookup per key in C beats hashing each one.
        self._owners: dict[bytes, int] = {}
        self._owners_n = 0

    # ------------------------------------------------------------------------------ the map
    @property
    def map(self) -> ClusterMap | None:
        return self._map

    @property
    def daemon_id(self) -> str | None:
        return None if self._map is None else self._map.daemon_id

    @property
    def limits(self) -> Limits:
        assert self._map is not None, "ensure() the map first"
        return self._map.limits

    @property
    def window(self) -> int:
        """Payload bytes one connection may have unacknowledged."""
        return self.limits.max_request_bytes

    def ensure(self, deadline: float) -> ClusterMap:
        """Return the map, fetching it first if this client has none yet."""
        if self._map is None:
            self.refresh(deadline)
        assert self._map is not None
        return self._map

    def refresh(self, deadline: float, quick: bool = False) -> ClusterMap | None:
        """Fetch the map; with ``quick``, give up after the retry's map_timeout and return None."""
        limit = min(deadline, time.monotonic() + self._retry.map_timeout) if quick else deadline
        try:
            reply = self.control_call(MapRequest(), limit)
        except LMCachedUnavailable:
            if quick:
                return None
            raise
        assert isinstance(reply, MapReply)
        self._map = reply.map
        self._sync()
        return self._map

    def owner_of(self, key: bytes) -> int:
        """Return the worker that owns ``key`` (remembered, as ``owners`` does)."""
        assert self._map is not None
        n = self._map.num_workers
        if n == 1:
            return 0
        if n != self._owners_n or len(self._owners) > OWNER_CACHE_KEYS:
            self._owners, self._owners_n = {}, n
        w = self._owners.get(key)
        if w is None:
            w = self._owners[key] = routing.owner(key, n)
        return w

    def owners(self, keys: Sequence[bytes]) -> dict[int, list[int]]:
        """Group the positions of ``keys`` by owning worker."""
        assert self._map is not None
        n = self._map.num_workers
        if n == 1:
            return {0: list(range(len(keys)))}
        if n != self._owners_n or len(self._owners) > OWNER_CACHE_KEYS:
            self._owners, self._owners_n = {}, n
        cache = self._owners
        found: list[int | None] = list(map(cache.get, keys))
        if None in found:
            route = routing.shared_route(keys)
            if route is not None:
                # A fresh prompt's chain: one owner computation for all of its keys, cached
                # (C-level) for the gets and puts of the same chain that follow.
                w = routing.route_owner(route, n)
                cache.update(zip(keys, repeat(w)))
                return {w: list(range(len(keys)))}
            for pos, key in enumerate(keys):
                if found[pos] is None:
                    found[pos] = cache[key] = routing.owner(key, n)
        workers = cast(list[int], found)
        if not workers or workers.count(workers[0]) == len(workers):  # one prompt's chain
            return {workers[0]: list(range(len(keys)))} if workers else {}
        groups: dict[int, list[int]] = {}
        for pos, w in enumerate(workers):
            groups.setdefault(w, []).append(pos)
        return groups

    def resync(self, deadline: float) -> ClusterMap | None:
        """Refresh the map after workers failed a call; None while the scheduler is unreachable."""
        if self._follows_file:
            self.reset_control()  # a restarted daemon may publish a new control endpoint
        return self.refresh(deadline, quick=True)

    def await_workers(self, workers: set[int], deadline: float) -> None:
        """Poll the map until the given workers are up again (new incarnation) or the deadline."""
        while True:
            new = self.resync(deadline)
            if new is not None and all(w in self._conns.workers for w in workers):
                return
            if time.monotonic() + self._retry.poll_interval >= deadline:
                raise LMCachedTimeout(
                    f"workers {sorted(workers)} did not come back before the deadline"
                )
            time.sleep(self._retry.poll_interval)

    def _use_ipc(self) -> bool:
        if self._transport == "ipc":
            return True
        if self._transport == "tcp":
            return False
        return self._map is not None and self._map.host_id == host_id()

    def _sync(self) -> None:
        """Reconnect to every worker whose incarnation or endpoint changed in the map."""
        assert self._map is not None
        ipc = self._use_ipc()
        for w in self._map.workers:
            endpoint = w.ipc if ipc else w.tcp  # None: not served that way (no enable_tcp)
            if not w.up or not endpoint:
                self._conns.drop(w.id)
                continue
            self._conns.connect(w.id, endpoint, (self._map.daemon_id, w.pid))
        for wid in list(self._conns.workers):
            if wid >= len(self._map.workers):
                self._conns.drop(wid)
        if self.on_sync is not None:
            same_host = self._transport != "tcp" and self._map.host_id == host_id()
            self.on_sync(self._map, same_host)

    # ---------------------------------------------------------------------- control socket
    def _control_socket(self) -> Socket:
        if self._control is None:
            ep = self._locate()
            self._control = self._conns.dealer(ep, unbounded=False)
            self._control_ep = ep
        return self._control

    def control_call(self, request: ControlRequest, deadline: float) -> ControlReply:
        """Send one control request and wait for its reply until ``deadline``."""
        sock = self._control_socket()
        request.id = next(self._ids)
        msg = protocol.encode_request(request)
        while True:
            try:
                sock.send(msg, zmq.NOBLOCK)
                break
            except zmq.Again:
                # Not connected (yet): wait for the connection, bounded by the deadline.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.reset_control()
                    raise LMCachedTimeout(
                        f"lmcached at {self._control_ep} is not reachable"
                    ) from None
                sock.poll(int(min(remaining, 0.05) * 1000) + 1, zmq.POLLOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                if time.monotonic() >= deadline:
                    self.reset_control()
                    raise LMCachedTimeout(
                        f"lmcached at {self._control_ep} did not answer '{request.op}' in time"
                    )
                continue
            try:
                raw = protocol.parse_reply(sock.recv())
                if raw.id != request.id:
                    continue  # a late reply to an earlier, timed-out request
                reply = protocol.decode_control_reply(request.op, raw)
            except ProtocolError as exc:
                if exc.code == protocol.E_VERSION:
                    raise LMCachedRequestError(exc.message, code=exc.code) from None
                raise LMCachedUnavailable(
                    f"malformed '{request.op}' reply from the scheduler: {exc.message}"
                ) from None
            if isinstance(reply, ErrorReply):
                raise LMCachedRequestError(reply.error, code=reply.code)
            return reply

    def reset_control(self) -> None:
        """Close the control socket; the next call reconnects (re-reading the runtime file)."""
        if self._control is not None:
            self._control.close(linger=0)
            self._control = None

    def forget(self) -> None:
        """Drop references to sockets of a parent process (after fork), without closing them."""
        self._control = None
