"""The Python client of lmcached: put, get, lookup and friends over ZMQ.

The client asks the scheduler once for the cluster map, then sends each key straight to the
worker that owns it (jump hash of xxh3-64, see :mod:`lmcached.routing`). A batch fans out to all
workers at once and is pipelined, with at most ``max_request_bytes`` of payload unacknowledged
per worker connection.

Every call has a deadline (``timeout=``). While it waits, the client probes the map every
:data:`PROBE_S`; when a worker it is waiting on was replaced (crash, daemon restart), it
reconnects and resends the unanswered requests once, within the same deadline. All ops are
idempotent, so a resend is safe.

Thread safety: one lock serialises calls on a Client; use one Client per thread for parallel
calls. Fork safety: a child process that uses an inherited Client gets fresh sockets.

Copies: ``put`` sends the caller's buffers zero-copy (they must not change until ``put``
returns). ``get`` returns each block as a memoryview over the received ZMQ frame (zero-copy)
when it arrived as one frame; a block larger than ``wire_frame_size`` arrives in sub-frames and
is joined into one bytes object (one copy). ``get_into`` copies into caller-owned buffers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash
import zmq

from lmcached import protocol, routing
from lmcached.errors import LMCachedRequestError, LMCachedTimeout, LMCachedUnavailable
from lmcached.malloc import tune_for_large_messages
from lmcached.protocol import Limits, split_payload
from lmcached.version import PROTOCOL_VERSION

DEFAULT_TIMEOUT_S = 10.0
PROBE_S = 0.25
MAP_TIMEOUT_S = 0.5


@dataclass
class _Request:
    """One message to one worker and, once answered, its reply."""

    worker: int
    header: dict[str, Any]
    frames: list[Any]
    nbytes: int
    # Index of each key of this request in the caller's batch.
    positions: list[int] = field(default_factory=list)
    rid: int = 0
    reply: dict[str, Any] | None = None
    reply_frames: list[zmq.Frame] = field(default_factory=list)
    retried: bool = False


@dataclass
class _Conn:
    """A DEALER connection to one worker incarnation."""

    sock: zmq.Socket
    endpoint: str
    identity: tuple[str, int | None]


class Client:
    """Store and fetch KV blocks in an lmcached daemon."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float | None = None,
        *,
        transport: str = "auto",
        config_path: str | os.PathLike[str] | None = None,
        curve: Any = None,
    ) -> None:
        if endpoint is None and config_path is None:
            raise ValueError("Client needs an endpoint such as tcp://127.0.0.1:7470 or config_path")
        if transport not in ("auto", "tcp", "ipc"):
            raise ValueError("transport must be auto, tcp or ipc")
        self._endpoint = endpoint
        self._config_path = str(config_path) if config_path is not None else None
        self.timeout = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
        self.transport = os.environ.get("LMCACHED_TRANSPORT", transport)
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._pid = os.getpid()
        self._ctx: zmq.Context | None = None
        self._control: zmq.Socket | None = None
        self._control_ep: str | None = None
        self._map: dict[str, Any] | None = None
        self._limits: Limits | None = None
        self._conns: dict[int, _Conn] = {}
        self._closed = False
        # CURVE credentials (lmcached.security.ClientCurve): given, else from the config
        # file's curve_* keys, else from LMCACHED_CURVE_*_KEY_FILE; None talks plain ZMQ.
        self._curve = curve
        self._curve_loaded = curve is not None
        tune_for_large_messages()

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str], timeout: float | None = None, **kw: Any
    ) -> Client:
        """Connect to the daemon started with the config file at ``path``.

        The endpoint is read from the daemon's runtime file on first use and again after a
        failure, so the client follows a daemon restarted on new ports.
        """
        return cls(None, timeout, config_path=path, **kw)

    # ------------------------------------------------------------------ public contract
    @property
    def cluster_map(self) -> dict[str, Any]:
        with self._lock:
            self._ensure_map(time.monotonic() + self.timeout)
            assert self._map is not None
            return self._map

    @property
    def chunk_size(self) -> int:
        return int(self.cluster_map["chunk_size"])

    def put(
        self,
        keys: Sequence[bytes],
        values: Sequence[Any],
        metas: Sequence[dict[str, Any] | None] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Store one block per key. Returns once every owning worker has it in memory."""
        if len(keys) != len(values):
            raise LMCachedRequestError(f"{len(keys)} keys but {len(values)} values")
        if metas is not None and len(metas) != len(keys):
            raise LMCachedRequestError(f"{len(keys)} keys but {len(metas)} metas")
        if not keys:
            return
        with self._lock:
            deadline = self._start(timeout)
            limits = self._require_limits(deadline)
            checksums = bool(self._map and self._map.get("checksums"))
            views = []
            for key, value in zip(keys, values, strict=True):
                self._check_key(key, limits)
                mv = memoryview(value)
                if mv.nbytes > limits.max_block_size:
                    raise LMCachedRequestError(
                        f"block for key {key[:80]!r} is {mv.nbytes} bytes; max_block_size is {limits.max_block_size}",
                        code=protocol.E_LIMIT,
                    )
                views.append(mv)
            requests = []
            for worker, positions in self._group(keys).items():
                batch: list[int] = []
                batch_bytes = 0
                for pos in positions:
                    size = views[pos].nbytes
                    if batch and (
                        len(batch) >= limits.max_keys_per_batch
                        or batch_bytes + size > limits.max_request_bytes
                    ):
                        requests.append(
                            self._put_request(worker, batch, keys, views, metas, checksums, limits)
                        )
                        batch, batch_bytes = [], 0
                    batch.append(pos)
                    batch_bytes += size
                requests.append(
                    self._put_request(worker, batch, keys, views, metas, checksums, limits)
                )
            self._execute(requests, deadline)

    def get(self, keys: Sequence[bytes], timeout: float | None = None) -> list[Any | None]:
        """Return each block's bytes (a buffer the caller owns), or None where missing."""
        return [None if r is None else r[0] for r in self.get_with_meta(keys, timeout)]

    def get_with_meta(
        self, keys: Sequence[bytes], timeout: float | None = None
    ) -> list[tuple[Any, dict[str, Any] | None] | None]:
        """Return (buffer, meta) for each found key, None where missing."""
        out: list[tuple[Any, dict[str, Any] | None] | None] = [None] * len(keys)
        for pos, frames, meta in self._fetch(keys, timeout):
            if len(frames) == 1:
                value: Any = frames[0].buffer  # zero-copy view; keeps the frame alive
            else:
                value = b"".join(f.buffer for f in frames)  # the one copy: sub-frames -> contiguous
            out[pos] = (value, meta)
        return out

    def get_into(
        self, keys: Sequence[bytes], buffers: Sequence[Any], timeout: float | None = None
    ) -> list[bool]:
        """Copy each found block into the caller's buffer of the same position; True where found.

        A buffer must be writable and at least as large as the block, else LMCachedRequestError.
        """
        if len(buffers) != len(keys):
            raise LMCachedRequestError(f"{len(keys)} keys but {len(buffers)} buffers")
        found = [False] * len(keys)
        for pos, frames, _meta in self._fetch(keys, timeout):
            dst = memoryview(buffers[pos]).cast("B")
            size = sum(len(f) for f in frames)
            if dst.readonly or dst.nbytes < size:
                raise LMCachedRequestError(
                    f"buffer {pos} is read-only or smaller than the block ({size} bytes)"
                )
            off = 0
            for f in frames:
                n = len(f)
                dst[off : off + n] = f.buffer  # the one copy, into the caller's memory
                off += n
            found[pos] = True
        return found

    def lookup(self, keys: Sequence[bytes], timeout: float | None = None) -> int:
        """Return how many leading keys are present (the prefix hit)."""
        # Keys of one prefix live on different workers, so each worker answers for its own keys
        # in one parallel round trip and the prefix ends at the first missing key.
        hit = 0
        for flag in self.exists(keys, timeout):
            if not flag:
                break
            hit += 1
        return hit

    def exists(self, keys: Sequence[bytes], timeout: float | None = None) -> list[bool]:
        """Return whether each key is present."""
        if not keys:
            return []
        out = [False] * len(keys)
        for req in self._run_keyed("exists", keys, timeout):
            assert req.reply is not None
            for pos, flag in zip(req.positions, req.reply.get("flags", []), strict=False):
                out[pos] = bool(flag)
        return out

    def delete(self, keys: Sequence[bytes], timeout: float | None = None) -> int:
        """Remove the keys from every tier; return how many were present."""
        if not keys:
            return 0
        return sum(
            int(r.reply.get("count", 0))
            for r in self._run_keyed("delete", keys, timeout)
            if r.reply
        )

    def purge(self, prefix: bytes, timeout: float | None = None) -> int:
        """Remove every key starting with ``prefix`` from every tier; return how many."""
        if not isinstance(prefix, bytes):
            raise LMCachedRequestError("prefix must be bytes")
        return sum(
            int(r.get("count", 0)) for r in self._broadcast("purge", {"prefix": prefix}, timeout)
        )

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the daemon's asynchronous tier writes are done."""
        t = self.timeout if timeout is None else timeout
        replies = self._broadcast("flush", {"timeout": t}, timeout)
        if not all(r.get("done") for r in replies):
            raise LMCachedTimeout("flush did not finish before its deadline")

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Round-trip the scheduler; return its pid and map epoch."""
        with self._lock:
            deadline = self._start(timeout)
            return self._control_call({"op": "ping"}, deadline)

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """Return the daemon's status: map epoch, and per worker its tiers' and ops' counters."""
        with self._lock:
            deadline = self._start(timeout)
            status = self._control_call({"op": "status"}, deadline)
            totals: dict[str, dict[str, int]] = {}
            for w in status.get("workers", []):
                for tier, counters in (w.get("stats", {}).get("store", {}) or {}).items():
                    if not isinstance(counters, dict):
                        continue
                    agg = totals.setdefault(tier, {})
                    for name, value in counters.items():
                        if isinstance(value, int) and not isinstance(value, bool):
                            agg[name] = agg.get(name, 0) + value
            status["totals"] = totals
            return status

    def control(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send a control op (status, reload, shutdown ...) to the scheduler; return its reply."""
        with self._lock:
            deadline = self._start(timeout)
            return self._control_call({"op": op, **fields}, deadline)

    def close(self) -> None:
        """Close every socket. Idempotent; safe after fork."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() == self._pid:
                self._drop_sockets()
                if self._ctx is not None:
                    self._ctx.term()
            self._ctx = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- internals
    def _start(self, timeout: float | None) -> float:
        if self._closed:
            raise LMCachedRequestError("client is closed")
        if os.getpid() != self._pid:
            # A forked child must not touch the parent's ZMQ context: forget it, build anew.
            self._pid = os.getpid()
            self._ctx = None
            self._control = None
            self._conns = {}
        t = self.timeout if timeout is None else float(timeout)
        if t <= 0:
            raise LMCachedRequestError("timeout must be > 0")
        return time.monotonic() + t

    def _context(self) -> zmq.Context:
        if self._ctx is None:
            self._ctx = zmq.Context(io_threads=1)
        return self._ctx

    def _drop_sockets(self) -> None:
        for conn in self._conns.values():
            conn.sock.close(linger=0)
        self._conns = {}
        if self._control is not None:
            self._control.close(linger=0)
            self._control = None

    def _resolve_control(self) -> str:
        if self._config_path is None:
            assert self._endpoint is not None
            return self._endpoint
        from lmcached import config as config_mod
        from lmcached import runtime

        cfg = config_mod.load(self._config_path)
        prefer = "ipc" if self.transport in ("auto", "ipc") else "tcp"
        ep = runtime.control_endpoint(cfg, prefer)
        if ep is None:
            raise LMCachedUnavailable(
                f"no lmcached daemon is running for {self._config_path} (no endpoints file)"
            )
        return ep

    def _secure(self, sock: zmq.Socket) -> None:
        if not self._curve_loaded:
            from lmcached.security import ClientCurve

            if self._config_path is not None:
                from lmcached import config as config_mod

                self._curve = ClientCurve.from_config(config_mod.load(self._config_path))
            else:
                self._curve = ClientCurve.load()
            self._curve_loaded = True
        if self._curve is not None:
            self._curve.apply(sock)

    def _control_socket(self) -> zmq.Socket:
        if self._control is None:
            ep = self._resolve_control()
            sock = self._context().socket(zmq.DEALER)
            self._secure(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.connect(ep)
            self._control, self._control_ep = sock, ep
        return self._control

    def _control_call(self, header: dict[str, Any], deadline: float) -> dict[str, Any]:
        """Send one control request and wait for its reply until ``deadline``."""
        try:
            sock = self._control_socket()
        except LMCachedUnavailable:
            raise
        rid = next(self._ids)
        msg = protocol.pack({"v": PROTOCOL_VERSION, "id": rid, **header})
        while True:
            try:
                sock.send(msg, zmq.NOBLOCK)
                break
            except zmq.Again:
                # Not connected (yet): wait for the connection, bounded by the deadline.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._reset_control()
                    raise LMCachedTimeout(
                        f"lmcached at {self._control_ep} is not reachable"
                    ) from None
                sock.poll(int(min(remaining, 0.05) * 1000) + 1, zmq.POLLOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                if time.monotonic() >= deadline:
                    self._reset_control()
                    raise LMCachedTimeout(
                        f"lmcached at {self._control_ep} did not answer '{header['op']}' in time"
                    )
                continue
            reply = protocol.unpack_header(sock.recv(), 64 << 20)
            if reply.get("id") != rid:
                continue  # a late reply to an earlier, timed-out request
            if not reply.get("ok"):
                raise LMCachedRequestError(str(reply.get("error")), code=str(reply.get("code")))
            return reply

    def _reset_control(self) -> None:
        if self._control is not None:
            self._control.close(linger=0)
            self._control = None

    def _refresh_map(self, deadline: float, quick: bool = False) -> dict[str, Any] | None:
        """Fetch the map; with ``quick``, give up after MAP_TIMEOUT_S and return None."""
        limit = min(deadline, time.monotonic() + MAP_TIMEOUT_S) if quick else deadline
        try:
            reply = self._control_call({"op": "map"}, limit)
        except LMCachedUnavailable:
            if quick:
                return None
            raise
        new = reply["map"]
        if new.get("protocol") != PROTOCOL_VERSION:
            raise LMCachedRequestError(
                f"daemon speaks protocol {new.get('protocol')}, this client {PROTOCOL_VERSION}",
                code=protocol.E_VERSION,
            )
        self._map = new
        self._limits = Limits.from_dict(new["limits"])
        self._sync_conns()
        return new

    def _ensure_map(self, deadline: float) -> None:
        if self._map is None:
            self._refresh_map(deadline)

    def _require_limits(self, deadline: float) -> Limits:
        self._ensure_map(deadline)
        assert self._limits is not None
        return self._limits

    def _use_ipc(self) -> bool:
        if self.transport == "ipc":
            return True
        if self.transport == "tcp":
            return False
        from lmcached.runtime import host_id

        return bool(self._map) and self._map.get("host_id") == host_id()

    def _identity(self, worker: dict[str, Any]) -> tuple[str, int | None]:
        assert self._map is not None
        return (str(self._map.get("daemon_id")), worker.get("pid"))

    def _sync_conns(self) -> None:
        """Reconnect to every worker whose incarnation or endpoint changed in the map."""
        assert self._map is not None
        ipc = self._use_ipc()
        for w in self._map["workers"]:
            wid = w["id"]
            conn = self._conns.get(wid)
            endpoint = (w.get("ipc") if ipc else w.get("tcp")) or w.get("tcp")
            if w.get("state") != "up" or not endpoint:
                if conn is not None:
                    conn.sock.close(linger=0)
                    del self._conns[wid]
                continue
            ident = self._identity(w)
            if conn is not None and conn.identity == ident and conn.endpoint == endpoint:
                continue
            if conn is not None:
                conn.sock.close(linger=0)
            sock = self._context().socket(zmq.DEALER)
            self._secure(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.connect(endpoint)
            self._conns[wid] = _Conn(sock, endpoint, ident)
        for wid in list(self._conns):
            if wid >= len(self._map["workers"]):
                self._conns.pop(wid).sock.close(linger=0)

    def _check_keys(self, keys: Sequence[Any], limits: Limits) -> None:
        """Validate a batch of keys; the common all-good case costs two C-level passes."""
        if (
            all(type(k) is bytes and k for k in keys)
            and max(map(len, keys)) <= limits.max_key_length
        ):
            return
        for k in keys:
            self._check_key(k, limits)

    def _check_key(self, key: Any, limits: Limits) -> None:
        if not isinstance(key, bytes) or not key:
            raise LMCachedRequestError(f"keys must be non-empty bytes, got {type(key).__name__}")
        if len(key) > limits.max_key_length:
            raise LMCachedRequestError(
                f"key {key[:40]!r}... is {len(key)} bytes; max_key_length is {limits.max_key_length}",
                code=protocol.E_LIMIT,
            )

    def _group(self, keys: Sequence[bytes]) -> dict[int, list[int]]:
        assert self._map is not None
        n = int(self._map["num_workers"])
        groups: dict[int, list[int]] = {}
        for pos, key in enumerate(keys):
            groups.setdefault(routing.cached_owner(key, n), []).append(pos)
        return groups

    def _run_keyed(self, op: str, keys: Sequence[bytes], timeout: float | None) -> list[_Request]:
        """Validate ``keys``, send one ``op`` request per owning worker and wait for the replies."""
        with self._lock:
            deadline = self._start(timeout)
            limits = self._require_limits(deadline)
            self._check_keys(keys, limits)
            requests = self._keyed_requests(op, keys, limits)
            self._execute(requests, deadline)
            return requests

    def _keyed_requests(self, op: str, keys: Sequence[bytes], limits: Limits) -> list[_Request]:
        requests = []
        for worker, positions in self._group(keys).items():
            for i in range(0, len(positions), limits.max_keys_per_batch):
                part = positions[i : i + limits.max_keys_per_batch]
                requests.append(
                    _Request(worker, {"op": op, "keys": [keys[p] for p in part]}, [], 0, part)
                )
        return requests

    def _put_request(
        self,
        worker: int,
        positions: list[int],
        keys: Sequence[bytes],
        views: list[memoryview],
        metas: Sequence[dict[str, Any] | None] | None,
        checksums: bool,
        limits: Limits,
    ) -> _Request:
        frames: list[Any] = []
        nframes: list[int] = []
        sizes: list[int] = []
        for pos in positions:
            parts = split_payload(views[pos], limits.wire_frame_size)
            frames.extend(parts)
            nframes.append(len(parts))
            sizes.append(views[pos].nbytes)
        header: dict[str, Any] = {
            "op": "put",
            "keys": [keys[p] for p in positions],
            "sizes": sizes,
            "nframes": nframes,
        }
        if metas is not None:
            header["metas"] = [metas[p] for p in positions]
        if checksums:
            header["sums"] = [xxhash.xxh3_64_intdigest(views[p]) for p in positions]
        return _Request(worker, header, frames, sum(sizes), positions)

    def _fetch(
        self, keys: Sequence[bytes], timeout: float | None
    ) -> list[tuple[int, list[zmq.Frame], dict[str, Any] | None]]:
        """Run a get; return (position, frames, meta) for every found key."""
        if not keys:
            return []
        requests = self._run_keyed("get", keys, timeout)
        out = []
        for req in requests:
            reply = req.reply
            assert reply is not None
            found, nframes, metas = (
                reply.get("found", []),
                reply.get("nframes", []),
                reply.get("metas", []),
            )
            if len(found) != len(req.positions) or sum(nframes) != len(req.reply_frames):
                raise LMCachedUnavailable("malformed get reply from worker")
            frame_pos = 0
            hit = 0
            for pos, flag in zip(req.positions, found, strict=True):
                if not flag:
                    continue
                count = nframes[hit]
                out.append(
                    (
                        pos,
                        req.reply_frames[frame_pos : frame_pos + count],
                        metas[hit] if hit < len(metas) else None,
                    )
                )
                frame_pos += count
                hit += 1
        return out

    def _broadcast(
        self, op: str, fields: dict[str, Any], timeout: float | None
    ) -> list[dict[str, Any]]:
        with self._lock:
            deadline = self._start(timeout)
            self._ensure_map(deadline)
            assert self._map is not None
            requests = [
                _Request(w, {"op": op, **fields}, [], 0)
                for w in range(int(self._map["num_workers"]))
            ]
            self._execute(requests, deadline)
            return [r.reply for r in requests if r.reply is not None]

    # ------------------------------------------------------------------ the request engine
    def _execute(self, requests: list[_Request], deadline: float) -> None:
        """Send every request to its worker, pipelined; resend once after a worker change."""
        pending = requests
        while pending:
            failed = self._pipeline(pending, deadline)
            if not failed:
                return
            if any(r.retried for r in failed):
                raise LMCachedUnavailable(
                    f"workers {sorted({r.worker for r in failed})} failed twice within one call"
                )
            for r in failed:
                r.retried = True
            self._await_workers({r.worker for r in failed}, deadline)
            pending = failed

    def _await_workers(self, workers: set[int], deadline: float) -> None:
        """Poll the map until the given workers are up again (new incarnation) or the deadline."""
        while True:
            if self._config_path is not None:
                self._reset_control()  # a restarted daemon may publish a new control endpoint
            new = self._refresh_map(deadline, quick=True)
            if new is not None and all(w in self._conns for w in workers):
                return
            if time.monotonic() + 0.05 >= deadline:
                raise LMCachedTimeout(
                    f"workers {sorted(workers)} did not come back before the deadline"
                )
            time.sleep(0.05)

    def _pipeline(self, requests: list[_Request], deadline: float) -> list[_Request]:
        """Run ``requests``; return the ones lost to a vanished worker (to be resent)."""
        if self._map is None or any(r.worker not in self._conns for r in requests):
            new = self._refresh_map(deadline, quick=True)
            if new is None:
                # Daemon unreachable right now: everything is "lost", _execute waits and retries.
                return requests
        assert self._limits is not None
        window = self._limits.max_request_bytes
        queues: dict[int, list[_Request]] = {}
        for r in requests:
            queues.setdefault(r.worker, []).append(r)
        inflight: dict[int, dict[int, _Request]] = {w: {} for w in queues}
        inflight_bytes = dict.fromkeys(queues, 0)
        failed: list[_Request] = []
        remaining_count = len(requests)
        next_probe = time.monotonic() + PROBE_S

        def fail_worker(w: int, close_conn: bool = True) -> None:
            nonlocal remaining_count
            lost = list(inflight[w].values()) + queues[w]
            failed.extend(lost)
            remaining_count -= len(lost)
            inflight[w].clear()
            queues[w] = []
            inflight_bytes[w] = 0
            conn = self._conns.pop(w, None) if close_conn else None
            if conn is not None:
                conn.sock.close(linger=0)  # drops anything still queued for the old incarnation

        def send_more(w: int) -> None:
            conn = self._conns.get(w)
            if conn is None:
                fail_worker(w)
                return
            q = queues[w]
            while q and (not inflight[w] or inflight_bytes[w] + q[0].nbytes <= window):
                r = q[0]
                r.rid = next(self._ids)
                header = protocol.pack({"v": PROTOCOL_VERSION, "id": r.rid, **r.header})
                try:
                    if r.frames:
                        conn.sock.send_multipart([header, *r.frames], copy=False, flags=zmq.NOBLOCK)
                    else:
                        conn.sock.send(header, flags=zmq.NOBLOCK)  # small: a copy is cheapest
                except zmq.Again:
                    return  # not connected yet; retried when the socket turns writable
                q.pop(0)
                inflight[w][r.rid] = r
                inflight_bytes[w] += r.nbytes

        for w in queues:
            send_more(w)
        while remaining_count > 0:
            now = time.monotonic()
            if now >= deadline:
                for w in list(inflight):
                    if inflight[w] or queues[w]:
                        conn = self._conns.pop(w, None)
                        if conn is not None:
                            conn.sock.close(linger=0)
                raise LMCachedTimeout("lmcached did not answer before the call's deadline")
            poller = zmq.Poller()
            for w in queues:
                conn = self._conns.get(w)
                if conn is None:
                    continue
                flags = zmq.POLLIN if inflight[w] else 0
                if queues[w]:
                    flags |= zmq.POLLOUT
                if flags:
                    poller.register(conn.sock, flags)
            wait = max(0.0, min(deadline, next_probe) - now)
            events = dict(poller.poll(int(wait * 1000) + 1))
            progressed = False
            for w in list(queues):
                conn = self._conns.get(w)
                if conn is None or conn.sock not in events:
                    continue
                if events[conn.sock] & zmq.POLLIN:
                    while True:
                        try:
                            msg = conn.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        reply = protocol.unpack_header(msg[0].bytes, 64 << 20)
                        r = inflight[w].pop(reply.get("id"), None)
                        if r is None:
                            continue  # late reply to an abandoned request
                        inflight_bytes[w] -= r.nbytes
                        remaining_count -= 1
                        progressed = True
                        if reply.get("d") != self._map.get("daemon_id"):
                            # A restarted daemon answered on the old path: our map (and so our
                            # routing) may be stale. Refresh and resend.
                            failed.append(r)
                            continue
                        if not reply.get("ok"):
                            code = str(reply.get("code"))
                            if code == protocol.E_UNAVAILABLE:
                                failed.append(r)
                                continue
                            raise LMCachedRequestError(
                                f"worker {w}: {reply.get('error')}", code=code
                            )
                        r.reply = reply
                        r.reply_frames = msg[1:]
                send_more(w)
            if progressed:
                next_probe = time.monotonic() + PROBE_S
            elif time.monotonic() >= next_probe:
                next_probe = time.monotonic() + PROBE_S
                self._probe(queues, inflight, fail_worker, deadline)
        return failed

    def _probe(
        self,
        queues: dict[int, list[_Request]],
        inflight: dict[int, dict[int, _Request]],
        fail_worker: Any,
        deadline: float,
    ) -> None:
        """No progress for a while: fail the workers whose incarnation is gone from the map."""
        waiting = [w for w in queues if inflight[w] or queues[w]]
        old = {w: self._conns[w].identity for w in waiting if w in self._conns}
        with contextlib.suppress(LMCachedRequestError):
            new = self._refresh_map(deadline, quick=True)
            if new is None:
                return  # scheduler unreachable: keep waiting until the deadline
            for w in waiting:
                conn = self._conns.get(w)
                if conn is None or conn.identity != old.get(w):
                    # _refresh_map already replaced the connection; keep the new one.
                    fail_worker(w, close_conn=False)
