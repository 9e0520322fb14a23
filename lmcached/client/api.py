"""The public :class:`Client`: put, get, lookup and friends, on top of the cluster view and the
connection layer.

Every call has a deadline (``timeout=``). A batch fans out to all owning workers at once and is
pipelined (:mod:`lmcached.client.connection`); when a worker it waits on was replaced, the call
resends as its :class:`~lmcached.client.retry.Retry` allows.

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
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import xxhash

from lmcached import protocol
from lmcached.client import settings as settings_mod
from lmcached.client.cluster import ClusterView
from lmcached.client.connection import Call, Connections, Pipeline
from lmcached.client.retry import Retry
from lmcached.client.shared import (
    Lease,
    PutBuffers,
    SharedMemory,
    Staging,
    buffer_address,
    put_buffer,
)
from lmcached.errors import (
    LMCachedError,
    LMCachedRequestError,
    LMCachedTimeout,
    LMCachedUnavailable,
)
from lmcached.malloc import tune_for_large_messages
from lmcached.protocol import (
    CONTROL_REQUESTS,
    DataRequest,
    DeleteReply,
    DeleteRequest,
    ExistsReply,
    ExistsRequest,
    FlushReply,
    FlushRequest,
    Frame,
    GetReply,
    GetRequest,
    Limits,
    LookupReply,
    LookupRequest,
    PingReply,
    PingRequest,
    PurgeReply,
    PurgeRequest,
    PutReply,
    PutRequest,
    StatusReply,
    StatusRequest,
    split_payload,
)
from lmcached.runtime import control_endpoint
from lmcached.security import ClientCurve
from lmcached.shm.layout import ArenaReader, SlotRef

__all__ = ["DEFAULT_TIMEOUT_S", "Client", "KeyLike"]

DEFAULT_TIMEOUT_S = 10.0
# Payload bytes of one staged same-host put request: small enough that the client stages the
# next request while the worker copies this one, large enough that headers stay negligible.
# A direct or buffer put stages nothing: one request per worker (up to max_request_bytes).
SHARED_PUT_BYTES = 8 << 20
# How long close() spends giving back the leases of dropped views (best effort).
LEASE_RETURN_TIMEOUT_S = 1.0
# Read by Client() given neither an endpoint nor a config file (a daemon's plugins get the first).
ENDPOINT_ENV = "LMCACHED_CONTROL_ENDPOINT"
# In the order the daemon's CLI reads them.
CONFIG_ENVS = ("LMCACHED_CONFIG", "LMCACHE_CONFIG_FILE")

# A key: bytes, or a str, which is sent as its UTF-8 encoding.
KeyLike = bytes | str


class _Shared:
    """A block served from a worker's arena: what the reader made of it (a view, or None)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


Hit = tuple[int, "Sequence[Frame] | _Shared", dict[str, Any] | None]
_Reader = Callable[[int, int, SlotRef, Lease], Any]


@dataclass(slots=True)
class _PutBatch:
    """One put call's blocks, checked against the limits, and where each one goes."""

    keys: Sequence[bytes]
    views: list[memoryview]
    metas: Sequence[dict[str, Any] | None] | None
    meta_sizes: Sequence[int]
    owners: dict[int, list[int]]  # worker id -> positions of its keys
    limits: Limits
    deadline: float

    def requests(self, max_bytes: int, block_header: int = 48) -> Iterator[tuple[int, list[int]]]:
        """(worker, positions) of each request, within the wire limits and ``max_bytes``.

        ``block_header``: the header bytes each block adds besides its key and meta.
        """
        limits = self.limits
        header_budget = limits.max_header_bytes - protocol.HEADER_SLACK // 2
        for worker, positions in self.owners.items():
            batch: list[int] = []
            batch_bytes = 0
            batch_header = 0
            for pos in positions:
                size = self.views[pos].nbytes
                # What the block adds to the header: its key, its meta, the fixed fields.
                header_cost = len(self.keys[pos]) + block_header + self.meta_sizes[pos]
                if batch and (
                    len(batch) >= limits.max_keys_per_batch
                    or batch_bytes + size > max_bytes
                    or batch_header + header_cost > header_budget
                ):
                    yield worker, batch
                    batch, batch_bytes, batch_header = [], 0, 0
                batch.append(pos)
                batch_bytes += size
                batch_header += header_cost
            if batch:
                yield worker, batch


ENDPOINT_SCHEMES = ("ipc://", "tcp://")


def check_endpoint(endpoint: str) -> None:
    """Raise a one-line LMCachedRequestError unless ``endpoint`` is a ZMQ endpoint we serve."""
    if not isinstance(endpoint, str) or not endpoint.startswith(ENDPOINT_SCHEMES):
        raise LMCachedRequestError(
            f"{endpoint!r} is not an lmcached endpoint; expected "
            "ipc:///PATH/control.sock (same host) or tcp://HOST:PORT (enable_tcp)",
            "bad_endpoint",
        )


class Client:
    """Store and fetch KV blocks in an lmcached daemon.

    On the daemon's host the client moves bytes through the workers' shared-memory arenas
    (docs/same-host.md); ``shared_memory=False`` (or ``LMCACHED_SHARED_MEMORY=0``) keeps it on
    ZMQ.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float | None = None,
        *,
        transport: str = "auto",
        config_path: str | os.PathLike[str] | None = None,
        curve: ClientCurve | None = None,
        retry: Retry | None = None,
        shared_memory: bool | None = None,
    ) -> None:
        if endpoint is None and config_path is None:
            # $LMCACHED_CONTROL_ENDPOINT, then the config file `lmcached start` would read
            # ($LMCACHED_CONFIG, LMCache's $LMCACHE_CONFIG_FILE), then the default config's
            # runtime file (config_path None below: built-in defaults plus LMCACHED_* overrides).
            endpoint = os.environ.get(ENDPOINT_ENV) or None
            if endpoint is None:
                config_path = next((os.environ[e] for e in CONFIG_ENVS if os.environ.get(e)), None)
        if transport not in ("auto", "tcp", "ipc"):
            raise ValueError("transport must be auto, tcp or ipc")
        if endpoint is not None:
            check_endpoint(endpoint)
        self._endpoint = endpoint
        self._config_path = str(config_path) if config_path is not None else None
        # Without an endpoint the daemon is found through its runtime file, again after a failure.
        self._follows_file = endpoint is None
        self._settings: settings_mod.ClientSettings | None = None
        # None: the config file's request_timeout (when there is one), else DEFAULT_TIMEOUT_S.
        self._timeout = None if timeout is None else float(timeout)
        self.transport = os.environ.get("LMCACHED_TRANSPORT", transport)
        self.retry = Retry() if retry is None else retry
        self._lock = threading.RLock()
        # Blocks put since the last flush, per worker id and per worker incarnation (the
        # process that took them): a flush answered by another incarnation reports them.
        self._unflushed: dict[int, dict[int | None, int]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        # CURVE credentials: given, else from the config file's curve_* keys, else from
        # LMCACHED_CURVE_*_KEY_FILE, else the daemon's generated pair beside an ipc endpoint;
        # None talks plain ZMQ.
        self._curve = curve
        # Weak: the parts must not refer back to the Client, so that a Client dropped without
        # close() is freed (and its sockets closed) at once, not left to the cycle collector.
        self._conns = Connections(_weak(self._load_curve))
        self._cluster = ClusterView(
            self._conns,
            _weak(self._locate),
            follows_file=self._follows_file,
            transport=self.transport,
            retry=self.retry,
            ids=self._ids,
        )
        self._pipeline = Pipeline(self._conns, self._cluster, self.retry, self._ids)
        # Same-host clients map the workers' arenas (docs/same-host.md); None: on unless
        # LMCACHED_SHARED_MEMORY=0.
        if shared_memory is None:
            shared_memory = os.environ.get("LMCACHED_SHARED_MEMORY", "1") not in ("0", "false")
        self._shm: SharedMemory | None = None
        self._buffers = PutBuffers()
        if shared_memory:
            self._shm = SharedMemory()
            self._cluster.on_sync = self._shm.sync
            # A Client dropped without close() (or alive at exit) still unlinks its staging file.
            weakref.finalize(self, self._shm.close)
        # When a lookup may next refresh the map because its owner's arena was left by a dead
        # worker (see _from_index).
        self._index_resync_at = 0.0
        tune_for_large_messages()

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str], timeout: float | None = None, **kw: Any
    ) -> Client:
        """Connect to the daemon started with the config file at ``path``.

        Only the client's keys are read from the file (runtime folder, instance, request_timeout,
        CURVE files). The endpoint is read from the daemon's runtime file on first use and again
        after a failure, so the client follows a daemon restarted on new ports.
        """
        return cls(None, timeout, config_path=path, **kw)

    @property
    def timeout(self) -> float:
        """The default deadline of a call, in seconds."""
        if self._timeout is not None:
            return self._timeout
        if self._follows_file:
            return self._read_settings().request_timeout
        return DEFAULT_TIMEOUT_S

    @timeout.setter
    def timeout(self, value: float) -> None:
        self._timeout = float(value)

    # ------------------------------------------------------------------ public contract
    @property
    def cluster_map(self) -> dict[str, Any]:
        with self._lock:
            return self._cluster.ensure(time.monotonic() + self.timeout).as_dict()

    @property
    def chunk_size(self) -> int:
        with self._lock:
            return self._cluster.ensure(time.monotonic() + self.timeout).chunk_size

    def put(
        self,
        keys: Sequence[KeyLike],
        values: Sequence[Any],
        metas: Sequence[dict[str, Any] | None] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Store one block per key. Returns once every owning worker has it in memory."""
        keys = _encode_keys(keys)
        if len(keys) != len(values):
            raise LMCachedRequestError(f"{len(keys)} keys but {len(values)} values")
        if metas is not None and len(metas) != len(keys):
            raise LMCachedRequestError(f"{len(keys)} keys but {len(metas)} metas")
        if not keys:
            return
        with self._lock:
            deadline = self._start(timeout)
            cmap = self._cluster.ensure(deadline)
            limits = cmap.limits
            views = []
            for pos, (key, value) in enumerate(zip(keys, values, strict=True)):
                _check_key(key, limits)
                mv = _value_view(pos, value)
                if mv.nbytes > limits.max_block_size:
                    raise LMCachedRequestError(
                        f"block for key {key[:80]!r} is {mv.nbytes} bytes; max_block_size is {limits.max_block_size}",
                        code=protocol.E_LIMIT,
                    )
                views.append(mv)
            meta_sizes = _check_metas(keys, metas, limits)
            batch = _PutBatch(
                keys, views, metas, meta_sizes, self._cluster.owners(keys), limits, deadline
            )
            if self._shm is not None and all(w in self._shm.arenas for w in batch.owners):
                held = self._buffers.holding(batch.views)
                if held is not None:
                    try:
                        self._put_from_buffer(batch, *held)
                        return
                    except LMCachedRequestError as exc:
                        # A worker that cannot open our memfd: put from it as from any memory.
                        if exc.code != protocol.E_MALFORMED:
                            raise
                        self._buffers.refuse(held[0])
                if self._shm.direct:
                    try:
                        self._put_direct(batch)
                        return
                    except LMCachedRequestError as exc:
                        # A worker that may not read this process (another user, a Yama
                        # ptrace scope, direct puts off): stage the blocks from now on. A
                        # put is idempotent, so the blocks already stored are stored again.
                        if exc.code != protocol.E_MALFORMED:
                            raise
                        self._shm.direct = False
                try:
                    self._put_shared(batch)
                    self._shm.memfd_confirmed = True  # the workers read our staging
                except LMCachedRequestError as exc:
                    # A worker that cannot open our staging memfd (another user, another pid
                    # namespace): stage in a file next to the arenas from now on. A put is
                    # idempotent, so the blocks already stored are simply stored again.
                    if exc.code != protocol.E_MALFORMED or not self._shm.refuse_memfd():
                        raise
                    self._put_shared(batch)
                return
            calls = [
                _put_call(worker, positions, keys, views, metas, cmap.checksums, limits)
                for worker, positions in batch.requests(limits.max_request_bytes)
            ]
            self._execute_puts(calls, deadline)

    def get(self, keys: Sequence[KeyLike], timeout: float | None = None) -> list[Any | None]:
        """Return each block's bytes (a buffer the caller owns), or None where missing."""
        return [None if r is None else r[0] for r in self.get_with_meta(keys, timeout)]

    def get_with_meta(
        self, keys: Sequence[KeyLike], timeout: float | None = None
    ) -> list[tuple[Any, dict[str, Any] | None] | None]:
        """Return (buffer, meta) for each found key, None where missing."""
        out: list[tuple[Any, dict[str, Any] | None] | None] = [None] * len(keys)
        for pos, frames, meta in self._fetch(keys, timeout, self._view):
            if isinstance(frames, _Shared):
                out[pos] = (frames.value, meta)
                continue
            if len(frames) == 1:
                value: Any = frames[0].buffer  # zero-copy view; keeps the frame alive
            else:
                value = b"".join(f.buffer for f in frames)  # the one copy: sub-frames -> contiguous
            out[pos] = (value, meta)
        return out

    def get_into(
        self, keys: Sequence[KeyLike], buffers: Sequence[Any], timeout: float | None = None
    ) -> list[bool]:
        """Copy each found block into the caller's buffer of the same position; True where found.

        A buffer must be writable, contiguous and at least as large as the block, else
        LMCachedRequestError (checked before anything is sent, but the size only once the
        block is found).
        """
        if len(buffers) != len(keys):
            raise LMCachedRequestError(f"{len(keys)} keys but {len(buffers)} buffers")
        # Checked before anything is sent: a buffer we cannot write into fails the call whole.
        sinks = [_sink_view(pos, buf) for pos, buf in enumerate(buffers)]
        found = [False] * len(keys)

        def into(worker: int, pos: int, ref: SlotRef, lease: Lease) -> Any:
            # The one copy, from the arena into the caller's memory; the lease ends right after.
            try:
                dst = sinks[pos]
                if dst.nbytes < ref.length:
                    raise LMCachedRequestError(
                        f"buffer {pos} is smaller than the block ({ref.length} bytes)"
                    )
                assert self._shm is not None
                self._shm.copy_into(worker, ref, dst)
            finally:
                lease.drop()
            return None

        for pos, frames, _meta in self._fetch(keys, timeout, into):
            if isinstance(frames, _Shared):
                found[pos] = True
                continue
            dst = sinks[pos]
            size = sum(len(f) for f in frames)
            if dst.nbytes < size:
                raise LMCachedRequestError(f"buffer {pos} is smaller than the block ({size} bytes)")
            off = 0
            for f in frames:
                n = len(f)
                dst[off : off + n] = f.buffer  # the one copy, into the caller's memory
                off += n
            found[pos] = True
        return found

    def buffer(self, nbytes: int) -> memoryview:
        """Writable memory of ``nbytes`` to put blocks from, faster than any other memory.

        On the daemon's host, a put whose blocks all lie in one such buffer costs no copy in
        this process: each worker copies the blocks from its own read-only mapping of the
        buffer, at memcpy speed (docs/same-host.md). Elsewhere it is ordinary memory. Keep the
        bytes unchanged until the put returns, as with any put. The memory lives as long as a
        view of it does, and any client of this process puts from it the same way (a client
        made after this one is closed, say).
        """
        if nbytes <= 0:
            raise ValueError("a buffer needs at least one byte")
        if not hasattr(os, "memfd_create"):
            return memoryview(bytearray(nbytes))
        return put_buffer(nbytes)

    def shared_arenas(self, timeout: float | None = None) -> list[tuple[int, memoryview, int]]:
        """Return (worker id, read-only view, size) of each worker arena this client has mapped.

        Empty when the daemon is on another host, shared memory is off, or the arenas cannot
        be mapped. A connector may register them with CUDA (``cudaHostRegister``) so a GPU
        copies straight from them; a restarted worker's new arena appears after the next map
        refresh (``shared_arenas()`` refreshes the map when it has none yet).
        """
        with self._lock:
            self._cluster.ensure(self._start(timeout))
            return [] if self._shm is None else self._shm.shared_arenas()

    def lookup(self, keys: Sequence[KeyLike], timeout: float | None = None) -> int:
        """Return how many leading keys are present (the prefix hit)."""
        if not keys:
            return 0
        if self._shm is not None:
            local = self._lookup_shared(keys, timeout)
            if local is not None:
                return local
        calls = self._run_keyed(LookupRequest, keys, timeout, whole_chain=True)
        if len(calls) == 1 and isinstance(calls[0].reply, LookupReply):
            # The routing rule puts a prompt's chain on one worker: it counted the prefix
            # itself, stopping at the first miss, in one round trip.
            return min(calls[0].reply.hit, len(keys))
        # Keys without a shared route live on several workers: each says which of its keys it
        # holds, in one parallel round trip, and the prefix ends at the first missing key.
        flags = [False] * len(keys)
        for call in calls:
            assert isinstance(call.reply, ExistsReply)
            for pos, flag in zip(call.positions, call.reply.flags, strict=False):
                flags[pos] = flag
        hit = 0
        for flag in flags:
            if not flag:
                break
            hit += 1
        return hit

    def _lookup_shared(self, keys: Sequence[KeyLike], timeout: float | None) -> int | None:
        """Count the prefix hit in the owner's presence index, without a round trip.

        None when the index cannot answer: an arena not mapped or no longer kept (its worker
        stopped or died), a miss that a lower tier might fill, or one on another worker.
        """
        return self._from_index(keys, timeout, self._read_prefix)

    def _read_prefix(self, arena: ArenaReader, worker: int, keys: Sequence[bytes]) -> int | None:
        hit = arena.leading_present(keys)
        if hit is None or hit == 0 or hit == len(keys):
            return hit
        # A key found in a worker's index is held there, whatever its route; so only the key
        # the count ends at must be that worker's, for its miss to be a miss in the daemon.
        # This spares a fresh prompt's lookup the check that all its keys share one route.
        return hit if self._cluster.owner_of(keys[hit]) == worker else None

    def _read_flags(
        self, arena: ArenaReader, worker: int, keys: Sequence[bytes]
    ) -> list[bool] | None:
        flags = arena.present(keys)
        if flags is None or all(flags):
            return flags
        owner_of = self._cluster.owner_of
        mine = all(owner_of(k) == worker for k, f in zip(keys, flags, strict=True) if not f)
        return flags if mine else None

    def _from_index(
        self,
        keys: Sequence[KeyLike],
        timeout: float | None,
        read: Callable[[ArenaReader, int, Sequence[bytes]], T | None],
    ) -> T | None:
        """Answer from the presence index of the first key's owner, or None (ask the workers)."""
        assert self._shm is not None
        encoded = _encode_keys(keys)
        with self._lock:
            deadline = self._start(timeout)
            _check_keys(encoded, self._cluster.ensure(deadline).limits)
            worker = self._cluster.owner_of(encoded[0])
            arena = self._shm.arenas.get(worker)
            if arena is None:
                return None
            found = read(arena, worker, encoded)
            now = time.monotonic()
            if found is None and now >= self._index_resync_at and not arena.live():
                # Its worker is gone. A client that only looks up never gets a reply naming
                # the restarted worker's arena, so the map has to: refresh it (at most once per
                # poll interval while the worker is down) and read the new arena.
                self._index_resync_at = now + self.retry.poll_interval
                with contextlib.suppress(LMCachedError):
                    self._cluster.refresh(deadline, quick=True)
                arena = self._shm.arenas.get(worker)
                found = None if arena is None else read(arena, worker, encoded)
            return found

    def exists(self, keys: Sequence[KeyLike], timeout: float | None = None) -> list[bool]:
        """Return whether each key is present."""
        if not keys:
            return []
        if self._shm is not None:
            local = self._from_index(keys, timeout, self._read_flags)
            if local is not None:
                return local
        out = [False] * len(keys)
        for call in self._run_keyed(ExistsRequest, keys, timeout):
            assert isinstance(call.reply, ExistsReply)
            for pos, flag in zip(call.positions, call.reply.flags, strict=False):
                out[pos] = flag
        return out

    def delete(self, keys: Sequence[KeyLike], timeout: float | None = None) -> int:
        """Remove the keys from every tier; return how many were present."""
        if not keys:
            return 0
        calls = self._run_keyed(DeleteRequest, keys, timeout)
        return sum(c.reply.count for c in calls if isinstance(c.reply, DeleteReply))

    def purge(self, prefix: KeyLike, timeout: float | None = None) -> int:
        """Remove every key starting with ``prefix`` from every tier; return how many."""
        if isinstance(prefix, str):
            prefix = prefix.encode()
        if not isinstance(prefix, bytes):
            raise LMCachedRequestError("prefix must be bytes or str")
        calls = self._broadcast(lambda: PurgeRequest(prefix), timeout)
        return sum(c.reply.count for c in calls if isinstance(c.reply, PurgeReply))

    def flush(self, timeout: float | None = None) -> FlushReport:
        """Wait until the daemon's asynchronous tier writes are done; report what was lost.

        Returns a :class:`FlushReport`: how many lower-tier (disk, remote) copies of this
        client's puts since its previous flush were dropped by a full write queue or failed to
        write, and how many were taken by a worker process that died since (``unconfirmed``:
        its restarted successor cannot vouch for them). ``report.complete`` is True when there
        were none, i.e. every block put since
        the last flush is now on every lower tier. Raises LMCachedTimeout when the writes did
        not finish before the deadline. Losses are reported, not raised: a block whose copy
        was lost is still served from memory while it stays there, and a cache user decides
        whether a lost copy matters (docs/client.md).
        """
        t = self.timeout if timeout is None else timeout
        with self._lock:  # no put may slip between the replies and the bookkeeping below
            calls = self._broadcast(lambda: FlushRequest(t), timeout)
            unconfirmed = 0
            for call in calls:
                if isinstance(call.reply, FlushReply):
                    # Blocks another process of this worker id took: their pending writes
                    # died with it, and this worker's counts cannot tell.
                    seen = self._unflushed.pop(call.worker, {})
                    unconfirmed += sum(
                        n for inc, n in seen.items() if inc != call.reply.incarnation
                    )
        replies = [c.reply for c in calls if isinstance(c.reply, FlushReply)]
        dropped = sum(r.dropped for r in replies)
        failed = sum(r.failed for r in replies)
        if len(replies) != len(calls) or not all(r.done for r in replies):
            raise LMCachedTimeout(
                "flush did not finish before its deadline"
                + (
                    f" ({dropped} dropped, {failed} failed writes so far, "
                    f"{unconfirmed} blocks put to a worker process that died)"
                    if dropped or failed or unconfirmed
                    else ""
                )
            )
        return FlushReport(dropped=dropped, failed=failed, unconfirmed=unconfirmed)

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        """Round-trip the scheduler; return its pid and map epoch."""
        with self._lock:
            deadline = self._start(timeout)
            reply = self._cluster.control_call(PingRequest(), deadline)
            assert isinstance(reply, PingReply)
            return protocol.reply_fields(reply)

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """Return the daemon's status: map epoch, and per worker its tiers' and ops' counters."""
        with self._lock:
            deadline = self._start(timeout)
            reply = self._cluster.control_call(StatusRequest(), deadline)
            assert isinstance(reply, StatusReply)
            status = protocol.reply_fields(reply)
            status["totals"] = reply.tier_totals()
            return status

    def control(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send a control op (status, reload, shutdown ...) to the scheduler; return its reply."""
        make = CONTROL_REQUESTS.get(op)
        if make is None:
            raise LMCachedRequestError(
                f"unknown op {op!r}; expected one of {sorted(CONTROL_REQUESTS)}",
                code=protocol.E_UNKNOWN_OP,
            )
        if fields:
            raise LMCachedRequestError(f"control op '{op}' takes no fields, got {sorted(fields)}")
        with self._lock:
            deadline = self._start(timeout)
            return protocol.reply_fields(self._cluster.control_call(make(), deadline))

    def close(self) -> None:
        """Close every socket. Idempotent; safe after fork."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._conns.forked():
                self._cluster.forget()
            else:
                self._return_leases()
            self._cluster.reset_control()
            self._conns.close()
            if self._shm is not None:
                self._shm.close()

    def _return_leases(self) -> None:
        """Give back the leases of views already dropped, which ride on the next get otherwise.

        Without this, a client that closes (a finished process) leaves its last slots pinned for
        ``lease_timeout``, and pinned slots scattered through an arena can keep a large block
        from finding room. Best effort, within a short deadline: the lease expiry still covers
        a client that dies without closing.
        """
        if self._shm is None or self._cluster.map is None:
            return
        calls = [
            Call(worker, GetRequest([], True, ids))
            for worker, ids in self._shm.releases.items()
            if ids and worker in self._shm.arenas
        ]
        self._shm.releases = {}
        if calls:
            with contextlib.suppress(LMCachedError):
                self._pipeline.execute(calls, time.monotonic() + LEASE_RETURN_TIMEOUT_S)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- internals
    def _start(self, timeout: float | None) -> float:
        if self._closed:
            raise LMCachedRequestError("client is closed")
        if self._conns.forked():
            self._cluster.forget()
        t = self.timeout if timeout is None else float(timeout)
        if t <= 0:
            raise LMCachedRequestError("timeout must be > 0")
        return time.monotonic() + t

    def _read_settings(self) -> settings_mod.ClientSettings:
        if self._settings is None:
            self._settings = settings_mod.load(self._config_path)
        return self._settings

    def _locate(self) -> str:
        """Return the scheduler's control endpoint: given, or from the daemon's runtime file."""
        if not self._follows_file:
            assert self._endpoint is not None
            return self._endpoint
        prefer = "ipc" if self.transport in ("auto", "ipc") else "tcp"
        settings = self._read_settings()
        ep = control_endpoint(settings, prefer)
        if ep is None:
            which = (
                self._config_path
                or f"the default config (none of {ENDPOINT_ENV}, {', '.join(CONFIG_ENVS)} is set)"
            )
            raise LMCachedUnavailable(
                f"no lmcached daemon is running for {which} (no endpoints file in "
                f"{settings.instance_dir})"
            )
        return ep

    def _load_curve(self) -> ClientCurve | None:
        if self._curve is not None:
            return self._curve
        if self._follows_file:
            return ClientCurve.from_config(self._read_settings())
        found = ClientCurve.load()
        if found is None and self._endpoint is not None:
            found = ClientCurve.beside_ipc(self._endpoint)
        return found

    def _run_keyed(
        self,
        make: type[GetRequest] | type[ExistsRequest] | type[DeleteRequest] | type[LookupRequest],
        keys: Sequence[KeyLike],
        timeout: float | None,
        whole_chain: bool = False,
    ) -> list[Call]:
        """Validate ``keys``, send one request per owning worker and wait for the replies.

        A ``LookupRequest`` is sent as such only when one request to one worker covers every
        key (``whole_chain``); otherwise it becomes per-worker ``ExistsRequest``s.
        """
        keys = _encode_keys(keys)
        with self._lock:
            deadline = self._start(timeout)
            limits = self._cluster.ensure(deadline).limits
            _check_keys(keys, limits)
            owners = self._cluster.owners(keys)
            if whole_chain and (len(owners) > 1 or len(keys) > limits.max_keys_per_batch):
                make = ExistsRequest
            if len(owners) == 1 and len(keys) <= limits.max_keys_per_batch:
                # One prompt's chain on one worker: the request takes the batch as it is.
                ((worker, positions),) = owners.items()
                call = Call(worker, make(list(keys)), positions=positions)
                return self._execute([call], deadline)
            calls = []
            for worker, positions in owners.items():
                for i in range(0, len(positions), limits.max_keys_per_batch):
                    part = positions[i : i + limits.max_keys_per_batch]
                    calls.append(Call(worker, make([keys[p] for p in part]), positions=part))
            return self._execute(calls, deadline)

    def _execute(self, calls: list[Call], deadline: float) -> list[Call]:
        self._pipeline.execute(calls, deadline)
        return calls

    def _fetch(
        self, keys: Sequence[KeyLike], timeout: float | None, shared: _Reader | None = None
    ) -> list[Hit]:
        """Run a get; return (position, frames, meta) for every found key.

        A block answered from a worker's arena is handed to ``shared(worker, position, slot,
        lease)`` and comes back as a :class:`_Shared` holding what that returned.
        """
        keys = _encode_keys(keys)
        if not keys:
            return []
        with self._lock:
            deadline = self._start(timeout)
            limits = self._cluster.ensure(deadline).limits
            _check_keys(keys, limits)
            shm = self._shm
            calls = []
            for worker, positions in self._cluster.owners(keys).items():
                mapped = shm is not None and shared is not None and worker in shm.arenas
                for i in range(0, len(positions), limits.max_keys_per_batch):
                    part = positions[i : i + limits.max_keys_per_batch]
                    release = shm.take_releases(worker) if shm is not None else []
                    request = GetRequest([keys[p] for p in part], mapped, release)
                    calls.append(Call(worker, request, positions=part))
            self._pipeline.execute(calls, deadline)
            out: list[Hit] = []
            for call in calls:
                reply = call.reply
                assert isinstance(reply, GetReply)
                if len(reply.found) != len(call.positions):
                    raise LMCachedUnavailable("malformed get reply from worker")
                lease = None
                if reply.slots is not None and reply.lease is not None:
                    assert shm is not None and shared is not None
                    # A worker restarted on the same socket path answers from a new arena.
                    shm.follow(call.worker, reply.arena)
                    n = sum(1 for sl in reply.slots if sl is not None)
                    lease = Lease(call.worker, reply.lease, n, shm.release_later)
                hit = 0
                for pos, flag in zip(call.positions, reply.found, strict=True):
                    if not flag:
                        continue
                    slot = reply.slots[hit] if reply.slots is not None else None
                    if slot is not None and lease is not None and shared is not None:
                        try:
                            ref = SlotRef.from_list(slot)
                        except ValueError as exc:
                            raise LMCachedUnavailable(f"malformed get reply: {exc}") from None
                        value = shared(call.worker, pos, ref, lease)
                        out.append((pos, _Shared(value), reply.metas[hit]))
                    else:
                        out.append((pos, reply.blocks[hit], reply.metas[hit]))
                    hit += 1
            return out

    def _view(self, worker: int, pos: int, ref: SlotRef, lease: Lease) -> Any:
        assert self._shm is not None
        return self._shm.view(worker, ref, lease)

    def _put_shared(self, put_batch: _PutBatch) -> None:
        """Same-host put: copy into the staging file (hashing as we go), then commit by header.

        Requests carry at most SHARED_PUT_BYTES each and are staged just before they are sent
        (Call.prepare), so the client copies the next request while the worker copies the
        previous one into its arena. When the staging file is full, the requests staged so far
        run to completion and the next round reuses it. The caller holds the lock.
        """
        keys, views, metas = put_batch.keys, put_batch.views, put_batch.metas
        deadline = put_batch.deadline
        assert self._shm is not None
        stage = self._shm.staging()
        calls: list[Call] = []
        used = 0  # staging bytes reserved this round
        # Half the staging file at most: with every block at most half of it too (its size is
        # at least twice max_block_size), any request fits in the file on its own.
        per_request = min(put_batch.limits.max_request_bytes, SHARED_PUT_BYTES, stage.size // 2)

        def call(worker: int, batch: list[int], offsets: list[int]) -> Call:
            put = PutRequest(
                [keys[p] for p in batch],
                [views[p].nbytes for p in batch],
                [() for _ in batch],
                metas=None if metas is None else [metas[p] for p in batch],
                sums=[],
                stage=stage.path,
                offsets=offsets,
            )

            def fill() -> None:
                # The one copy, hashed piece by piece while each piece is in cache.
                put.sums = [
                    stage.write(off, _bytes_view(views[p]))
                    for p, off in zip(batch, offsets, strict=True)
                ]

            return Call(worker, put, [], 0, batch, prepare=fill)

        # Each block's header entry carries an offset and a checksum too.
        for worker, batch in put_batch.requests(per_request, block_header=64):
            # Blocks stay 64-byte aligned in the staging file.
            need = [-(-views[p].nbytes // 64) * 64 for p in batch]
            if used + sum(need) > stage.size:
                # The staging file is full: commit what it holds, then reuse it.
                self._execute_puts(calls, deadline)
                calls, used = [], 0
            offsets = []
            for n in need:
                offsets.append(used)
                used += n
            calls.append(call(worker, batch, offsets))
        if calls:
            self._execute_puts(calls, deadline)

    def _put_from_buffer(self, batch: _PutBatch, buf: Staging, offsets: list[int]) -> None:
        """Same-host put of blocks that lie in a buffer from :meth:`buffer`: no client copy.

        The requests name the buffer's memfd and each block's offset in it, and carry this
        call's deadline; each worker copies the blocks from its own read-only mapping of the
        memfd (memcpy), hashing as it copies. As for a direct put, the buffers are read until
        every request is answered or the deadline has passed. The caller holds the lock.
        """
        sizes = [v.nbytes for v in batch.views]
        self._put_in_place(
            batch, sizes, lambda ps: {"stage": buf.path, "offsets": [offsets[p] for p in ps]}
        )

    def _put_direct(self, batch: _PutBatch) -> None:
        """Same-host put in one copy: each worker reads its blocks from this process's memory.

        The requests carry the blocks' addresses and this call's deadline; the workers copy
        (and hash) straight into their arenas. The caller's buffers are read until every request
        is answered, so this returns only then, or once the deadline has passed, after which no
        worker uses what it reads (lmcached.storage.peer_memory). The caller holds the lock.
        """
        flat = [_bytes_view(v) for v in batch.views]  # (holds a non-contiguous copy alive)
        addrs = [buffer_address(v) for v in flat]
        sizes = [v.nbytes for v in flat]
        self._put_in_place(batch, sizes, lambda ps: {"addrs": [addrs[p] for p in ps]})

    def _put_in_place(
        self,
        batch: _PutBatch,
        sizes: list[int],
        where: Callable[[list[int]], dict[str, Any]],
    ) -> None:
        """Send a same-host put whose workers read each block where it lies (no payload).

        ``where(positions)`` gives the request's fields that locate those blocks. Every request
        carries this call's deadline, and the blocks are borrowed until every request is
        answered or the deadline has passed (the pipeline waits that long before it raises).
        """
        until = int(batch.deadline * 1e9)  # time.monotonic is CLOCK_MONOTONIC, as the worker's
        metas = batch.metas
        calls = [
            Call(
                worker,
                PutRequest(
                    [batch.keys[p] for p in positions],
                    [sizes[p] for p in positions],
                    [() for _ in positions],
                    metas=None if metas is None else [metas[p] for p in positions],
                    until=until,
                    **where(positions),
                ),
                [],
                0,
                positions,
            )
            for worker, positions in batch.requests(batch.limits.max_request_bytes)
        ]
        self._execute_puts(calls, batch.deadline, borrowed=True)

    def _execute_puts(self, calls: list[Call], deadline: float, borrowed: bool = False) -> None:
        """Run put calls; note which worker incarnation took each one's blocks (for flush)."""
        try:
            self._pipeline.execute(calls, deadline, borrowed)
        finally:
            # Also after a failure: the calls that were answered did store their blocks.
            for call in calls:
                if isinstance(call.reply, PutReply):
                    seen = self._unflushed.setdefault(call.worker, {})
                    inc = call.reply.incarnation
                    seen[inc] = seen.get(inc, 0) + call.reply.stored

    def _broadcast(self, make: Callable[[], DataRequest], timeout: float | None) -> list[Call]:
        """Send one request built by ``make()`` to every worker and wait for the replies."""
        with self._lock:
            deadline = self._start(timeout)
            cmap = self._cluster.ensure(deadline)
            calls = [Call(w, make()) for w in range(cmap.num_workers)]
            self._pipeline.execute(calls, deadline)
            return [c for c in calls if c.reply is not None]


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class FlushReport:
    """What :meth:`Client.flush` found: lower-tier copies of this client's puts that were lost.

    ``dropped``: a full write queue dropped the copy (the daemon never blocks a put on a slow
    disk or remote). ``failed``: the tier's write failed or refused the block.
    ``unconfirmed``: blocks taken by a worker process that died (``kill -9``, a crash) before
    this flush; the restarted worker cannot know whether their copies were written. Counted
    since this client's previous flush, summed over the workers.
    """

    dropped: int = 0
    failed: int = 0
    unconfirmed: int = 0

    @property
    def lost(self) -> int:
        return self.dropped + self.failed + self.unconfirmed

    @property
    def complete(self) -> bool:
        """True when every copy reached its tiers (nothing dropped or failed)."""
        return self.lost == 0


def _weak(method: Callable[[], T]) -> Callable[[], T]:
    """Return a callable for a bound method of the Client that does not keep the Client alive."""
    ref = weakref.WeakMethod(method)

    def call() -> T:
        bound = ref()
        if bound is None:
            raise LMCachedRequestError("client is closed")
        return bound()

    return call


def _value_view(pos: int, value: Any) -> memoryview:
    """A put's value as a memoryview; LMCachedRequestError unless it is bytes-like."""
    try:
        return memoryview(value)
    except TypeError:
        raise LMCachedRequestError(
            f"value {pos} is a {type(value).__name__}, not a bytes-like object"
        ) from None


def _sink_view(pos: int, buf: Any) -> memoryview:
    """A get_into buffer as a flat writable byte view; LMCachedRequestError if it is not one."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise LMCachedRequestError(
            f"buffer {pos} is a {type(buf).__name__}, not a writable bytes-like object"
        ) from None
    if view.readonly:
        raise LMCachedRequestError(f"buffer {pos} is read-only")
    if not view.c_contiguous:
        raise LMCachedRequestError(f"buffer {pos} is not contiguous (a strided view)")
    return _bytes_view(view)  # contiguous: a cast, never a copy


def _bytes_view(mv: memoryview) -> memoryview:
    """A flat byte view of a caller's buffer (a copy only for a non-contiguous one)."""
    if mv.format == "B" and mv.ndim == 1:
        return mv
    return mv.cast("B") if mv.c_contiguous else memoryview(mv.tobytes())


def _encode_keys(keys: Sequence[KeyLike]) -> Sequence[bytes]:
    """Return ``keys`` with each str key encoded as UTF-8 (the all-bytes case is not copied)."""
    # One C-level pass over the types (a lookup's 128 keys cost ~1 us, a generator ~5 us).
    if set(map(type, keys)) <= {bytes}:
        return cast("Sequence[bytes]", keys)
    try:
        return [k.encode() if isinstance(k, str) else k for k in keys]
    except UnicodeEncodeError as exc:
        raise LMCachedRequestError(f"a str key is not valid UTF-8: {exc}") from None


def _check_keys(keys: Sequence[Any], limits: Limits) -> None:
    """Validate a batch of keys; the common all-good case costs two C-level passes."""
    # The distinct lengths are few (a prompt's chunk keys share one), so their bounds are
    # checked on a tiny set rather than by two more passes over the keys.
    if set(map(type, keys)) == {bytes}:
        lengths = set(map(len, keys))
        if min(lengths) > 0 and max(lengths) <= limits.max_key_length:
            return
    for k in keys:
        _check_key(k, limits)


def _check_key(key: Any, limits: Limits) -> None:
    if not isinstance(key, bytes) or not key:
        got = "an empty key" if isinstance(key, bytes) else type(key).__name__
        raise LMCachedRequestError(f"keys must be non-empty bytes or str, got {got}")
    if len(key) > limits.max_key_length:
        raise LMCachedRequestError(
            f"key {key[:40]!r}... is {len(key)} bytes; max_key_length is {limits.max_key_length}",
            code=protocol.E_LIMIT,
        )


def _check_metas(
    keys: Sequence[bytes], metas: Sequence[dict[str, Any] | None] | None, limits: Limits
) -> list[int]:
    """Return each block's meta size; raise the daemon's own limit error before sending."""
    if metas is None:
        return [0] * len(keys)
    sizes = []
    for key, meta in zip(keys, metas, strict=True):
        if meta is None:
            sizes.append(0)
            continue
        if not isinstance(meta, dict):
            raise LMCachedRequestError(f"meta for key {key[:80]!r} must be a dict or None")
        try:
            size = protocol.meta_size(meta)
        except (TypeError, ValueError) as exc:
            raise LMCachedRequestError(
                f"meta for key {key[:80]!r} cannot be encoded: {exc}"
            ) from None
        if size > limits.max_meta_bytes:
            raise LMCachedRequestError(
                f"meta for key {key[:80]!r} is {size} bytes; max_meta_bytes is "
                f"{limits.max_meta_bytes}",
                code=protocol.E_LIMIT,
            )
        sizes.append(size)
    return sizes


def _put_call(
    worker: int,
    positions: list[int],
    keys: Sequence[bytes],
    views: list[memoryview],
    metas: Sequence[dict[str, Any] | None] | None,
    checksums: bool,
    limits: Limits,
) -> Call:
    frames: list[Frame] = []
    blocks: list[Sequence[Frame]] = []
    sizes: list[int] = []
    for pos in positions:
        parts = split_payload(views[pos], limits.wire_frame_size)
        frames.extend(parts)
        blocks.append(parts)
        sizes.append(views[pos].nbytes)
    request = PutRequest(
        [keys[p] for p in positions],
        sizes,
        blocks,
        metas=None if metas is None else [metas[p] for p in positions],
        sums=[xxhash.xxh3_64_intdigest(views[p]) for p in positions] if checksums else None,
    )
    return Call(worker, request, frames, sum(sizes), positions)
