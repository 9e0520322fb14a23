"""The connection layer: one DEALER socket per worker, and the engine that pipelines requests.

:class:`Connections` owns this process's ZMQ context and its sockets. It records the pid that
built them: a forked child that inherits a client must not touch the parent's context, so it
forgets everything and builds anew. CURVE credentials are applied to every socket before it
connects.

:class:`Pipeline` sends a call's requests to their workers at once, with at most
``max_request_bytes`` of payload unacknowledged per connection, matches replies by request id,
and resends the requests lost to a replaced worker as its :class:`~lmcached.client.retry.Retry`
allows, all within the call's deadline.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from lmcached import protocol
from lmcached.client.retry import Retry
from lmcached.errors import (
    LMCachedBusy,
    LMCachedError,
    LMCachedRequestError,
    LMCachedTimeout,
    LMCachedUnavailable,
)
from lmcached.protocol import DataReply, DataRequest, ErrorReply, Frame, ProtocolError
from lmcached.security import ClientCurve

__all__ = ["Call", "ClusterHooks", "Connection", "Connections", "Pipeline"]

Socket = zmq.Socket[Any]
# Plain ints: pyzmq's enum flags cost a Python-level __and__ per test on the hot path.
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)


@dataclass(slots=True)
class Connection:
    """A DEALER connection to one worker incarnation."""

    sock: Socket
    endpoint: str
    # (daemon id, worker pid): a change means a new incarnation, whose socket is a new one.
    identity: tuple[str, int | None]


@dataclass(slots=True)
class Call:
    """One request to one worker and, once answered, its reply."""

    worker: int
    request: DataRequest
    frames: list[Frame] = field(default_factory=list)
    nbytes: int = 0
    # Index of each key of this request in the caller's batch.
    positions: list[int] = field(default_factory=list)
    reply: DataReply | None = None
    resends: int = 0
    # Run once just before the request is first sent (a same-host put stages its bytes then,
    # so staging overlaps the worker's work on the previous request).
    prepare: Callable[[], None] | None = None


class _Sockets:
    """A process's ZMQ context and every socket made from it, so they can be closed together.

    A weakref.finalize on the owning :class:`Connections` holds this object. If the client is
    dropped unclosed, even inside a reference cycle, the finalizer closes the sockets and then
    terminates the context. Left to itself, pyzmq's Context finalizer would call ``term()``
    with the sockets still open (the cycle collector has already cleared the weak set through
    which the context knows its sockets) and block for ever.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.ctx: zmq.Context[Any] | None = None
        self.open: list[Socket] = []

    def socket(self, kind: int) -> Socket:
        if self.ctx is None:
            self.ctx = zmq.Context(io_threads=1)
        self.open = [s for s in self.open if not s.closed]  # forget the ones closed meanwhile
        sock = self.ctx.socket(kind)
        self.open.append(sock)
        return sock

    def close(self) -> None:
        """Close every socket, then the context (only in the process that made them)."""
        if os.getpid() == self.pid:
            for sock in self.open:
                sock.close(linger=0)
            if self.ctx is not None:
                self.ctx.term()
        self.open = []
        self.ctx = None


class Connections:
    """This process's ZMQ context and its per-worker sockets; rebuilt after a fork."""

    def __init__(self, curve: Callable[[], ClientCurve | None]) -> None:
        self._load_curve = curve
        self._curve: ClientCurve | None = None
        self._curve_loaded = False
        self._sockets = _Sockets()
        self._finalizer = weakref.finalize(self, _Sockets.close, self._sockets)
        self.workers: dict[int, Connection] = {}

    def forked(self) -> bool:
        """Forget the parent's context and sockets in a forked child; return True if so."""
        if os.getpid() == self._sockets.pid:
            return False
        # Closing them would touch the parent's context: drop the references, build anew.
        self._finalizer.detach()
        self._sockets = _Sockets()
        self._finalizer = weakref.finalize(self, _Sockets.close, self._sockets)
        self.workers = {}
        return True

    def dealer(self, endpoint: str, *, unbounded: bool) -> Socket:
        """Return a connected DEALER; ``unbounded`` lifts the high-water marks (pipelining)."""
        sock = self._sockets.socket(zmq.DEALER)
        if not self._curve_loaded:
            self._curve = self._load_curve()
            self._curve_loaded = True
        if self._curve is not None:
            self._curve.apply(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if unbounded:
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            # Closed now: an open socket would block the context's term() in close() for ever.
            sock.close(linger=0)
            raise LMCachedRequestError(
                f"cannot connect to {endpoint!r}: {exc}", "bad_endpoint"
            ) from None
        return sock

    def connect(self, worker: int, endpoint: str, identity: tuple[str, int | None]) -> None:
        """Connect to ``worker`` unless already connected to this incarnation and endpoint."""
        conn = self.workers.get(worker)
        if conn is not None and conn.identity == identity and conn.endpoint == endpoint:
            return
        if conn is not None:
            conn.sock.close(linger=0)
        self.workers[worker] = Connection(self.dealer(endpoint, unbounded=True), endpoint, identity)

    def drop(self, worker: int) -> Connection | None:
        """Close the connection to ``worker`` (anything queued for it is dropped)."""
        conn = self.workers.pop(worker, None)
        if conn is not None:
            conn.sock.close(linger=0)
        return conn

    def close(self) -> None:
        """Close every socket (the control socket too) and the context. Idempotent."""
        self._finalizer()  # runs _Sockets.close once; later calls do nothing
        self.workers = {}


class ClusterHooks(Protocol):
    """What the pipeline asks of the cluster view (see lmcached.client.cluster)."""

    @property
    def daemon_id(self) -> str | None: ...

    @property
    def window(self) -> int: ...

    def refresh(self, deadline: float, quick: bool = False) -> object | None: ...

    def resync(self, deadline: float) -> object | None: ...

    def await_workers(self, workers: set[int], deadline: float) -> None: ...


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


class Pipeline:
    """Run a call's requests over the worker connections, pipelined, resending as allowed."""

    def __init__(
        self, conns: Connections, cluster: ClusterHooks, retry: Retry, ids: Iterator[int]
    ) -> None:
        self.conns = conns
        self.cluster = cluster
        self.retry = retry
        self._ids = ids

    def execute(self, calls: list[Call], deadline: float, borrowed: bool = False) -> None:
        """Send every call to its worker; resend those lost to a worker change.

        ``borrowed``: the requests let their workers read the caller's memory until answered
        or until ``deadline`` (a direct same-host put). Such a call never returns, nor raises,
        while one of them is still in flight and the deadline is ahead: the caller may reuse
        its buffers as soon as it has returned.
        """
        pending = calls
        while pending:
            failed = self._run(pending, deadline, borrowed)
            if not failed:
                return
            if any(c.resends >= self.retry.resends for c in failed):
                # Leave a fresh map behind, so that the caller's next call is routed right.
                with contextlib.suppress(LMCachedError):
                    self.cluster.resync(deadline)
                raise LMCachedUnavailable(
                    f"workers {sorted({c.worker for c in failed})} failed "
                    f"{_times(self.retry.resends + 1)} within one call"
                )
            for c in failed:
                c.resends += 1
            self.cluster.await_workers({c.worker for c in failed}, deadline)
            pending = failed

    def _run(self, calls: list[Call], deadline: float, borrowed: bool = False) -> list[Call]:
        """Run ``calls``; return the ones lost to a vanished worker (to be resent)."""
        conns = self.conns.workers
        if self.cluster.daemon_id is None or any(c.worker not in conns for c in calls):
            if self.cluster.refresh(deadline, quick=True) is None:
                # Daemon unreachable right now: everything is "lost"; execute() waits, resends.
                return calls
            conns = self.conns.workers
        window = self.cluster.window
        probe_s = self.retry.probe_interval
        queues: dict[int, list[Call]] = {}
        for c in calls:
            queues.setdefault(c.worker, []).append(c)
        inflight: dict[int, dict[int, Call]] = {w: {} for w in queues}
        inflight_bytes = dict.fromkeys(queues, 0)
        failed: list[Call] = []
        remaining = len(calls)
        next_probe = time.monotonic() + probe_s

        def fail_worker(w: int, close_conn: bool = True) -> None:
            nonlocal remaining
            lost = list(inflight[w].values()) + queues[w]
            failed.extend(lost)
            remaining -= len(lost)
            inflight[w].clear()
            queues[w] = []
            inflight_bytes[w] = 0
            if close_conn:
                self.conns.drop(w)  # drops anything still queued for the old incarnation

        def send_more(w: int) -> None:
            conn = self.conns.workers.get(w)
            if conn is None:
                fail_worker(w)
                return
            q = queues[w]
            while q and (not inflight[w] or inflight_bytes[w] + q[0].nbytes <= window):
                c = q[0]
                if c.prepare is not None:
                    c.prepare()
                    c.prepare = None
                c.request.id = next(self._ids)
                header = protocol.encode_request(c.request)
                try:
                    if c.frames:
                        conn.sock.send_multipart([header, *c.frames], copy=False, flags=zmq.NOBLOCK)
                    else:
                        conn.sock.send(header, flags=zmq.NOBLOCK)  # small: a copy is cheapest
                except zmq.Again:
                    return  # not connected yet; retried when the socket turns writable
                q.pop(0)
                inflight[w][c.request.id] = c
                inflight_bytes[w] += c.nbytes

        try:
            for w in queues:
                send_more(w)
            while remaining > 0:
                now = time.monotonic()
                if now >= deadline:
                    for w in list(inflight):
                        if inflight[w] or queues[w]:
                            self.conns.drop(w)
                    raise LMCachedTimeout("lmcached did not answer before the call's deadline")
                poller = zmq.Poller()
                for w in queues:
                    conn = self.conns.workers.get(w)
                    if conn is None:
                        continue
                    flags = _POLLIN if inflight[w] else 0
                    if queues[w]:
                        flags |= _POLLOUT
                    if flags:
                        poller.register(conn.sock, flags)
                wait = max(0.0, min(deadline, next_probe) - now)
                events = dict(poller.poll(int(wait * 1000) + 1))
                progressed = False
                for w in list(queues):
                    conn = self.conns.workers.get(w)
                    if conn is None or conn.sock not in events:
                        continue
                    if events[conn.sock] & _POLLIN:
                        # Read until this worker owes nothing more: one more recv would only raise
                        # zmq.Again (a costly exception per call). A late reply to an abandoned
                        # request left queued is read, and dropped, by the next call.
                        while inflight[w]:
                            try:
                                msg = conn.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                            except zmq.Again:
                                break
                            done = self._take(w, msg, inflight[w], failed)
                            if done is None:
                                continue  # late reply to an abandoned request
                            inflight_bytes[w] -= done.nbytes
                            remaining -= 1
                            progressed = True
                    send_more(w)
                if progressed:
                    next_probe = time.monotonic() + probe_s
                elif time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + probe_s
                    self._probe(queues, inflight, fail_worker, deadline)
        except BaseException:
            if borrowed:
                self._drain(inflight, deadline)
            raise
        return failed

    def _drain(self, inflight: dict[int, dict[int, Call]], deadline: float) -> None:
        """Read, and drop, the replies to requests still in flight, until ``deadline``."""
        while time.monotonic() < deadline:
            waiting = {
                w: calls for w, calls in inflight.items() if calls and w in self.conns.workers
            }
            if not waiting:
                return
            poller = zmq.Poller()
            for w in waiting:
                poller.register(self.conns.workers[w].sock, zmq.POLLIN)
            events = dict(poller.poll(max(1, int((deadline - time.monotonic()) * 1000) + 1)))
            for w, calls in waiting.items():
                sock = self.conns.workers[w].sock
                if sock not in events:
                    continue
                while calls:
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    with contextlib.suppress(ProtocolError):
                        rid = protocol.parse_reply(msg[0].bytes).id
                        if rid is not None:
                            calls.pop(rid, None)

    def _take(
        self, w: int, msg: list[zmq.Frame], inflight: dict[int, Call], failed: list[Call]
    ) -> Call | None:
        """Match one reply with its call; the call is answered, or added to ``failed``."""
        try:
            raw = protocol.parse_reply(msg[0].bytes)
        except ProtocolError as exc:
            raise LMCachedUnavailable(f"worker {w} sent an unreadable reply: {exc}") from None
        c = inflight.pop(raw.id, None) if raw.id is not None else None
        if c is None:
            return None
        if raw.daemon != self.cluster.daemon_id:
            # A restarted daemon answered on the old path: our map (and so our routing) may be
            # stale. Refresh and resend.
            failed.append(c)
            return c
        try:
            reply = protocol.decode_data_reply(c.request.op, raw, msg[1:])
        except ProtocolError as exc:
            raise LMCachedUnavailable(
                f"malformed {c.request.op} reply from worker {w}: {exc}"
            ) from None
        if isinstance(reply, ErrorReply):
            if reply.code == protocol.E_UNAVAILABLE:
                failed.append(c)
                return c
            if reply.code == protocol.E_BUSY:
                # Backpressure belongs to the caller: a resend now would only add to the load.
                raise LMCachedBusy(f"worker {w}: {reply.error}")
            raise LMCachedRequestError(f"worker {w}: {reply.error}", code=reply.code)
        c.reply = reply
        return c

    def _probe(
        self,
        queues: dict[int, list[Call]],
        inflight: dict[int, dict[int, Call]],
        fail_worker: Callable[[int, bool], None],
        deadline: float,
    ) -> None:
        """No progress for a while: fail the workers whose incarnation is gone from the map."""
        conns = self.conns.workers
        waiting = [w for w in queues if inflight[w] or queues[w]]
        old = {w: conns[w].identity for w in waiting if w in conns}
        with contextlib.suppress(LMCachedRequestError):
            if self.cluster.refresh(deadline, quick=True) is None:
                return  # scheduler unreachable: keep waiting until the deadline
            for w in waiting:
                conn = self.conns.workers.get(w)
                if conn is None or conn.identity != old.get(w):
                    # refresh() already replaced the connection; keep the new one.
                    fail_worker(w, False)
