"""A worker process: one shard of the cache behind a ZMQ ROUTER data endpoint.

Run by the scheduler as ``python -m lmcached.daemon.worker --config-json F --worker-id N``. One thread
serves the requests; work that may block (disk and remote reads) goes to a
thread pool through :meth:`Worker.submit_io` and its reply is sent when it completes, so a slow
tier never delays a CPU hit. A put runs in slices of at most ``SLICE_S`` (see :class:`_Job`), so
one large put does not delay a CPU hit either. This process never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import xxhash
import zmq

from lmcached import config as config_mod
from lmcached import logs, protocol
from lmcached.daemon.assembly import build_store
from lmcached.daemon.op_latency import OpLatency
from lmcached.daemon.script_plugins import WorkerPlugins
from lmcached.errors import EXIT_CONFIG_INVALID, EXIT_PLUGIN_FATAL, ConfigError
from lmcached.extensions.general import ProcessInfo, general_plugin_states, run_general_plugins
from lmcached.extensions.lifecycle import PluginStartupError
from lmcached.extensions.startup import extension_states
from lmcached.malloc import heap_usage, release_free_memory, tune_for_large_messages
from lmcached.protocol import (
    DATA_OPS,
    DataReply,
    DataRequest,
    DeleteReply,
    DeleteRequest,
    ErrorReply,
    ExistsReply,
    ExistsRequest,
    FlushReply,
    FlushRequest,
    GetReply,
    GetRequest,
    Hello,
    LookupReply,
    LookupRequest,
    PingRequest,
    ProtocolError,
    PurgeReply,
    PurgeRequest,
    PutReply,
    PutRequest,
    StatsReply,
    StatsRequest,
    WorkerPingReply,
)
from lmcached.runtime import bind_endpoints
from lmcached.security import AuthGuard, ServerCurve, secure_ipc_socket
from lmcached.storage import piece_copy
from lmcached.storage.arena import Arena, FileRange, StageMaps
from lmcached.storage.base import Block
from lmcached.storage.peer_memory import PeerRange, PeerRefused, Peers
from lmcached.version import __version__

POLL_MS = 500
# While puts keep the loop busy, dead clients' stages and peers are swept this often.
BUSY_SWEEP_S = 1.0
# Plain ints: pyzmq's enum flags cost a Python-level __and__ per test on the hot path.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
# The longest a flush may hold an I/O thread, whatever the client asked: an abandoned flush
# must not keep a pool thread (of 4) for ever.
MAX_FLUSH_TIMEOUT_S = 60.0
# An oversized message at least this large is followed by malloc_trim (see Worker.receive).
TRIM_AFTER_BYTES = 16 << 20
# Free heap memory a worker idle after a burst may keep for the next one; beyond it, the
# allocator gives its free pages back (Worker._trim_when_idle).
IDLE_KEPT_FREE = 64 << 20
# The longest a put holds the request loop before the loop reads what arrived meanwhile: one
# put of 4,096 long keys took ~43 ms, a 64 MiB block's copy and hash ~22 ms, and a CPU hit
# queued behind either waited that long.
SLICE_S = 0.002
# Requests that wait behind a put in progress, in arrival order: each changes what the put
# stores (a later put or delete of its keys) or reports on it (flush). Others (get, lookup,
# exists, ping, stats) are served between the put's slices.
ORDERED_OPS = frozenset({"put", "delete", "purge", "flush"})
# A full garbage collection walks every tracked object, about four per CPU-tier entry (its
# Block, frames tuple, view and arena slot): with 60k entries it held the loop 50-250 ms, and
# a stream of small-block puts set one off every few puts (the default third threshold is 10).
# Entries form no cycles; the young generations still collect those that requests make.
GC_THRESHOLDS = (700, 10, 1000)


class WorkerBusy(Exception):
    """The worker is at max_inflight_bytes or its I/O queue is full; answered with E_BUSY."""


@dataclass(slots=True)
class _Job:
    """A request being served in slices (a put), or waiting for the one in progress to end.

    ``steps`` is the op's continuation once started: the loop resumes it between polls, so
    the requests that arrived meanwhile are answered between two slices.
    """

    envelope: Any
    req: Any  # a decoded data request
    received: float
    nbytes: int  # the message's bytes, held until the job ends
    steps: Iterator[None] | None = None
    timed: bool = False  # its latency is observed here at its end (not by submit_io)


class OpStats:
    """Per-op request counters of this worker."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        # The part of bytes_out handed to same-host clients as arena slots (no payload frame):
        # how an operator tells that reads go through shared memory rather than the socket.
        self.bytes_out_shared = 0
        # The part of bytes_in that workers read from same-host clients' memory (direct puts).
        self.bytes_in_direct = 0
        # The part of bytes_in copied from buffers clients allocated with Client.buffer.
        self.bytes_in_buffer = 0
        self.lookup_keys = 0
        self.lookup_hits = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "bytes_out_shared": self.bytes_out_shared,
            "bytes_in_direct": self.bytes_in_direct,
            "bytes_in_buffer": self.bytes_in_buffer,
            "lookup_keys": self.lookup_keys,
            "lookup_hits": self.lookup_hits,
        }


# The average block size from which the blocks of a same-host put (direct, Client.buffer, a
# staging memfd) are copied side by side. Measured on a 2-core VM through the daemon, one
# client, 32 MiB a call, 4 rounds in ABBA order (2026-12-03): 256 KiB blocks 1.37-2.04x faster
# side by side (direct) and 1.17-1.48x (from a buffer); 64 KiB blocks 0.95-0.98x (direct) and
# 0.82-0.98x (buffer, alternating rounds): below that the loop thread's Python per block,
# under the GIL, starves the helper. (Before a batch's copies were signalled under one
# condition, 256 KiB blocks had lost too: 0.37x -> 0.26x a memcpy.)
BATCH_MIN_BLOCK = 256 << 10


class Worker:
    """Serve one shard: decode requests, apply them to the TieredStore, reply."""

    def __init__(self, cfg: config_mod.Config, worker_id: int) -> None:
        self.cfg = cfg
        self.worker_id = worker_id
        self.limits = config_mod.wire_limits(cfg)
        self.log = logs.get_logger("lmcached.daemon.worker")
        self.store = build_store(cfg, worker_id)
        cpu = self.store.top
        self.arena: Arena | None = getattr(cpu, "arena", None)
        if self.arena is not None:
            # Same-host clients count a prompt's hits in the arena's presence index; a key it
            # lacks is a final miss only when no lower tier could hold it.
            self.arena.set_final_misses(not self.store.has_lower)
        # Same-host puts: the clients' staging files this worker has mapped (read-only).
        self.stages = StageMaps(os.path.dirname(self.arena.path)) if self.arena else None
        # Direct same-host puts: the client processes whose memory this worker reads.
        self.peers = Peers() if self.arena is not None and cfg.direct_put else None
        # Threads that copy same-host puts (their sources release the GIL): the blocks of one
        # put side by side, or the pieces of one large block. Started on first use.
        self.copy_pool = (
            ThreadPoolExecutor(piece_copy.COPY_THREADS, thread_name_prefix="put-copy")
            if self.arena is not None
            else None
        )
        # ZMQ replies sent zero-copy from arena slots: (tracker, pin) until libzmq is done.
        self._sending: list[tuple[zmq.MessageTracker, int]] = []
        self.ops = OpStats()
        self.latency = OpLatency()
        # (op, receipt time) of the request being dispatched on the loop; submit_io takes it
        # over so that an op answered from the I/O pool is timed until its reply.
        self._dispatching: tuple[str, float] | None = None
        self.started_at = time.time()
        # Stamped on put and flush replies: a client whose puts went to another incarnation
        # than the one answering its flush learns that their pending writes died with it.
        self.incarnation = int.from_bytes(os.urandom(8), "little") >> 1
        self._stop = threading.Event()
        self._ctx = zmq.Context(io_threads=1)
        self._router: zmq.Socket | None = None
        self._io_pool: ThreadPoolExecutor | None = None
        # Completions posted by I/O threads; the loop drains them after a byte on the pipe.
        self._done: deque[Callable[[], None]] = deque()
        # Backpressure: I/O jobs running or queued, and the request bytes they hold.
        self._io_jobs = 0
        self._inflight_bytes = 0
        # Bytes of the message being dispatched; submit_io takes them over like _dispatching.
        self._dispatching_bytes = 0
        # The put in progress (first) and the ordered requests behind it, with the bytes of
        # their messages. Past max_inflight_bytes the loop stops reading new messages (libzmq
        # keeps them) until the put in progress ends.
        self._jobs: deque[_Job] = deque()
        self._held_bytes = 0
        # Requests came in since the heap was last trimmed (see _trim_when_idle).
        self._served_since_trim = False
        # Frames and bytes one message may have (identity frame and header included).
        self._max_message_frames = self.limits.max_frames + 1
        self._max_message_bytes = self.limits.max_header_bytes + self.limits.max_request_bytes
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.endpoints: dict[str, str] = {}
        self._closed = False
        # Extra sections of the stats reply (plugins ...), each a callable returning a dict.
        self.stats_extras: list[Callable[[], dict[str, Any]]] = []
        curve = ServerCurve.from_config(cfg)
        self.auth = AuthGuard(self._ctx, curve) if curve is not None else None
        if self.auth is not None and curve is not None:
            self.auth.authorize(curve.public)  # the scheduler probes us with the daemon's keys

    # ----------------------------------------------------------------------------- set-up
    def bind(self) -> dict[str, str]:
        # Owned before binding: close() must close it even when a bind fails, or term() hangs.
        sock = self._router = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A backstop only: the map carries the limits and clients check them before sending.
        sock.setsockopt(
            zmq.MAXMSGSIZE, max(self.limits.wire_frame_size, self.limits.max_header_bytes) + 4096
        )
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        if self.auth is not None:
            self.auth.secure(sock)
        cfg = self.cfg
        self.endpoints = bind_endpoints(
            sock,
            cfg,
            f"worker-{self.worker_id}",
            None if not cfg.enable_tcp else 0 if cfg.port == 0 else cfg.port + 1 + self.worker_id,
        )
        secure_ipc_socket(self.endpoints["ipc"], cfg.socket_group)
        if self.arena is not None:
            self.endpoints["arena"] = self.arena.path
        return self.endpoints

    def register(self, internal_endpoint: str) -> None:
        """Tell the scheduler our endpoints; it publishes them in the cluster map."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(internal_endpoint)
        sock.send(protocol.encode_hello(Hello(self.worker_id, os.getpid(), self.endpoints)))
        sock.close()

    # ------------------------------------------------------------------------ off-loop I/O
    def submit_io(
        self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run ``fn`` on the I/O pool; call ``done(result, error)`` later on the loop thread.

        Raises WorkerBusy, submitting nothing, when the pool already holds ``io_queue_depth``
        jobs, or when the request being handed over would take the request bytes the pool
        holds past ``max_inflight_bytes``: a queue without a bound is a latency without one.
        A request served on the loop is never refused for its bytes: it is done with before
        the next message is read, so at most one such message adds to the pool's bytes.
        """
        if self._io_jobs >= self.cfg.io_queue_depth:
            raise WorkerBusy(
                f"worker {self.worker_id} is busy: its I/O queue holds {self._io_jobs} jobs "
                f"(io_queue_depth); retry later"
            )
        would_hold = self._inflight_bytes + self._dispatching_bytes
        # A lone request always goes through, whatever its size: the bound must not stall.
        if self._inflight_bytes and would_hold > self.cfg.max_inflight_bytes:
            raise WorkerBusy(
                f"worker {self.worker_id} is busy: its I/O queue holds {self._inflight_bytes} "
                f"request bytes, max_inflight_bytes is {self.cfg.max_inflight_bytes}; "
                "retry later"
            )
        if self._io_pool is None:
            self._io_pool = ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"w{self.worker_id}-io"
            )
        held, self._dispatching_bytes = self._dispatching_bytes, 0
        timed, self._dispatching = self._dispatching, None  # timed at reply, not at hand-off
        self._io_jobs += 1
        self._inflight_bytes += held

        def settle(result: Any, exc: BaseException | None) -> None:
            self._io_jobs -= 1
            self._inflight_bytes -= held
            try:
                done(result, exc)
            finally:
                if timed is not None:
                    op, received = timed
                    self.latency.observe(op, time.perf_counter() - received)

        def finished(fut: Future[Any]) -> None:
            exc = fut.exception()
            result = None if exc is not None else fut.result()
            self._done.append(lambda: settle(result, exc))
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

        self._io_pool.submit(fn).add_done_callback(finished)

    def _drain_completions(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake_r, 4096)
        while self._done:
            callback = self._done.popleft()
            try:
                callback()
            except Exception:
                self.log.exception("io_completion_failed")

    # ----------------------------------------------------------------------------- replies
    def reply(self, envelope: Any, msg: DataReply | ErrorReply, pin: int | None = None) -> None:
        """Send a reply to the client identified by ``envelope`` (loop thread only).

        ``pin`` holds arena slots whose bytes the reply sends zero-copy: it is released once
        libzmq has sent them (or at the lease timeout), so eviction cannot reuse them meanwhile.
        """
        assert self._router is not None
        payload = protocol.payload_of(msg)
        try:
            if pin is None:
                self._router.send_multipart(
                    [envelope, protocol.encode_reply(msg), *payload], copy=False
                )
                return
            # pyzmq copies frames below its copy threshold at send time; only the larger ones
            # are read later by libzmq's I/O thread, so only those keep the pin.
            tracked = [
                zmq.Frame(f, copy=False, track=True) if len(f) >= zmq.COPY_THRESHOLD else f
                for f in payload
            ]
            self._router.send_multipart(
                [envelope, protocol.encode_reply(msg), *tracked], copy=False
            )
            frames = [f for f in tracked if isinstance(f, zmq.Frame)]
            if frames:
                self._sending.append((zmq.MessageTracker(*frames), pin))
                pin = None
        except zmq.ZMQError as exc:
            # The peer is gone or its queue is full: a dropped reply is the client's timeout.
            self.log.warning("reply_dropped", error=str(exc))
        finally:
            if pin is not None and self.arena is not None:
                self.arena.unpin(pin)

    def _release_pins(self) -> None:
        """Unpin slots whose zero-copy sends are done; expire leases past their timeout."""
        if self.arena is None:
            return
        if self._sending:
            still = []
            for tracker, pin in self._sending:
                if tracker.done:
                    self.arena.unpin(pin)
                else:
                    still.append((tracker, pin))
            self._sending = still
        self.arena.expire_pins()

    def reply_error(self, envelope: Any, rid: int, code: str, message: str) -> None:
        self.ops.errors[code] = self.ops.errors.get(code, 0) + 1
        self.reply(envelope, ErrorReply(code, message, id=rid))

    # ------------------------------------------------------------------------------ serving
    def receive(self) -> list[zmq.Frame] | None:
        """Take one message off the ROUTER, frame by frame; raise zmq.Again when none is queued.

        libzmq hands a message over only once all of it has arrived, so a peer can make it
        buffer one far over our limits (ZMQ_MAXMSGSIZE bounds single frames only). Reading it
        frame by frame, we stop keeping frames at the first one over the limits, drop the rest
        as they are read, answer ``limit`` and give the heap back to the kernel: the flood
        costs its transfer once, never a resident copy. Returns None for such a message.
        """
        assert self._router is not None
        sock = self._router
        first = sock.recv(zmq.NOBLOCK, copy=False)
        frames = [first]
        nbytes = 0
        more = first.more
        while more:
            frame = sock.recv(copy=False)
            more = frame.more
            nbytes += len(frame)
            frames.append(frame)
            if len(frames) > self._max_message_frames or nbytes > self._max_message_bytes:
                break
        else:
            return frames
        dropped = len(frames)
        frames.clear()
        while more:
            frame = sock.recv(copy=False)
            more = frame.more
            nbytes += len(frame)
            dropped += 1
        del frame
        self.reply_error(
            first,
            0,
            protocol.E_LIMIT,
            f"message of {dropped - 1} frames exceeds the limits ({self.limits.max_frames} "
            f"frames, {self._max_message_bytes} bytes)",
        )
        del first
        # libzmq holds about 64 bytes per frame besides the payload. malloc_trim walks the
        # heap, so only a message big enough to matter pays for it.
        if nbytes + 64 * dropped >= TRIM_AFTER_BYTES:
            release_free_memory()
        self.log.warning("oversized_message_dropped", frames=dropped - 1, bytes=nbytes)
        return None

    def handle_message(self, frames: list[zmq.Frame]) -> None:
        """Validate one ROUTER message and serve it; malformed input gets an error reply."""
        if len(frames) < 2:
            return  # no header frame: nothing to answer
        received = time.perf_counter()
        envelope = frames[0]
        if len(frames) - 1 > self.limits.max_frames:
            self.reply_error(
                envelope,
                0,
                protocol.E_LIMIT,
                f"{len(frames) - 1} frames exceed the limit of {self.limits.max_frames}",
            )
            return
        header_frame = frames[1]
        if len(header_frame) > self.limits.max_header_bytes:
            self.reply_error(envelope, 0, protocol.E_LIMIT, "header frame too large")
            return
        try:
            # Decoded from libzmq's buffer: a copy of a large header (metas) as bytes would be
            # one more transient allocation of its size per request, fragmenting the heap.
            req = protocol.decode_request(header_frame.buffer, frames[2:], self.limits, DATA_OPS)
        except ProtocolError as exc:
            self.reply_error(envelope, exc.request_id, exc.code, exc.message)
            return
        self.ops.requests[req.op] = self.ops.requests.get(req.op, 0) + 1
        job = _Job(envelope, req, received, sum(len(f) for f in frames[1:]))
        self._served_since_trim = True
        # Behind a put in progress, an ordered request waits its turn; anything else starts
        # now, and a put that does not end within its first slice is resumed by the loop.
        queued = bool(self._jobs) and req.op in ORDERED_OPS
        if queued or not self._run(job, time.perf_counter() + SLICE_S):
            self._hold(job)

    def _hold(self, job: _Job) -> None:
        self._jobs.append(job)
        self._held_bytes += job.nbytes

    def _run(self, job: _Job, deadline: float) -> bool:
        """Serve ``job`` until it is done (True) or ``deadline`` passed (False: resume later)."""
        req = job.req
        try:
            if job.steps is None:
                self._dispatching = (req.op, job.received)
                self._dispatching_bytes = job.nbytes
                try:
                    job.steps = getattr(self, f"op_{req.op}")(job.envelope, req)
                finally:
                    self._dispatching_bytes = 0
                    job.timed = self._dispatching is not None  # else submit_io times it
                    self._dispatching = None
            if job.steps is not None:
                for _ in job.steps:
                    if time.perf_counter() >= deadline:
                        return False
        except WorkerBusy as exc:
            self.reply_error(job.envelope, req.id, protocol.E_BUSY, str(exc))
        except Exception as exc:  # a bug must cost one request, never the worker
            self.log.exception("request_failed", op=req.op)
            self.reply_error(
                job.envelope, req.id, protocol.E_INTERNAL, f"{type(exc).__name__}: {exc}"
            )
        job.steps = None
        if job.timed:  # answered on the loop: receipt to reply
            self.latency.observe(req.op, time.perf_counter() - job.received)
        return True

    def _step_jobs(self) -> None:
        """Give the held jobs one slice, in order; a job that ends lets the next one start."""
        deadline = time.perf_counter() + SLICE_S
        while self._jobs:
            job = self._jobs[0]
            if not self._run(job, deadline):
                return
            self._jobs.popleft()
            self._held_bytes -= job.nbytes
            if time.perf_counter() >= deadline:
                return

    def _drop_jobs(self) -> None:
        """Abandon the held jobs unanswered (stopping): a put in progress gives back its slot."""
        while self._jobs:
            job = self._jobs.popleft()
            self._held_bytes -= job.nbytes
            if job.steps is not None:
                close = getattr(job.steps, "close", None)
                if close is not None:
                    close()

    def op_put(self, envelope: Any, req: PutRequest) -> Iterator[None]:
        """Store the blocks, yielding between blocks and between pieces of a large one.

        Acknowledged only once every block is stored or refused; a refused block fails alone.
        """
        if req.addrs is not None:
            yield from self.put_direct(envelope, req)
            return
        if req.stage is not None:
            yield from self.put_staged(envelope, req)
            return
        metas = req.metas or [None] * len(req.keys)
        sums = req.sums or [None] * len(req.keys)
        stored = 0
        # The connection's routing id: its next flush reports this put's lost lower-tier copies.
        origin = envelope.bytes if self.store.has_lower else None
        for key, group, size, meta, checksum in zip(
            req.keys, req.blocks, req.sizes, metas, sums, strict=True
        ):
            yield
            # The received ZMQ frames become the stored buffers, outside the arena: a copy
            # into a slot would cost a remote put about 15% of its speed (tcp with CURVE).
            block = Block(frames=tuple(group), nbytes=size, meta=meta, checksum=checksum)
            if (yield from self.store.put_steps(key, block, origin, keep_buffers=True)):
                stored += 1
            self.ops.bytes_in += size
        self.reply(envelope, PutReply(stored, self.incarnation, id=req.id))

    def put_direct(self, envelope: Any, req: PutRequest) -> Iterator[None]:
        """A direct same-host put: copy each block from the client's own memory into the arena.

        The client process is the one the kernel names for this connection; its deadline bounds
        when its memory may be read (lmcached.storage.peer_memory). A put this worker cannot
        serve so (the kernel forbids reading that process, direct puts are off) is refused with
        ``malformed``, and the client stages its blocks instead.
        """
        assert req.addrs is not None and req.until is not None
        if self.peers is None:
            self.reply_error(envelope, req.id, protocol.E_MALFORMED, "direct puts are off")
            return
        try:
            peer = self.peers.get(envelope.get("Peer-Address"))
            # Probe with a block that has bytes: a 0-byte block's address proves nothing.
            probe = next((a for a, n in zip(req.addrs, req.sizes, strict=True) if n), None)
            if probe is not None:
                peer.check_readable(probe)
        except PeerRefused as exc:
            self.reply_error(envelope, req.id, protocol.E_MALFORMED, f"direct put refused: {exc}")
            return
        metas = req.metas or [None] * len(req.keys)
        sums = req.sums or [None] * len(req.keys)
        origin = envelope.bytes if self.store.has_lower else None
        # Blocks side by side on the loop thread and a copy thread, or (one block, or lower
        # tiers) block by block, a large block split over the copy threads.
        batch = self._batch_copies(req.sizes)
        pool = None if batch else self.copy_pool
        sources = [
            PeerRange(peer, addr, size, req.until, pool)
            for addr, size in zip(req.addrs, req.sizes, strict=True)
        ]
        stored = 0
        try:
            if batch:
                stored = yield from self._put_batch(req.keys, sources, metas, sums, origin)
                self.ops.bytes_in_direct += sum(req.sizes)
            else:
                for key, src, meta, checksum in zip(req.keys, sources, metas, sums, strict=True):
                    yield
                    stored += yield from self._put_one_same_host(key, src, meta, checksum, origin)
        except PeerRefused as exc:  # the kernel refused a copy the probe could not foresee
            self.reply_error(envelope, req.id, protocol.E_MALFORMED, f"direct put refused: {exc}")
            return
        self.reply(envelope, PutReply(stored, self.incarnation, id=req.id))

    def _put_one_same_host(
        self,
        key: bytes,
        src: PeerRange | FileRange,
        meta: dict[str, Any] | None,
        checksum: int | None,
        origin: bytes | None,
    ) -> Generator[None, None, int]:
        """Store one block of a direct, staged or buffer put; 1 if it was stored."""
        size = src.nbytes
        if self.store.has_lower:
            # Lower tiers write later, from a copy of their own: never from the client's
            # memory, and the slot may be evicted first. Checked as the CPU tier checks.
            buf = bytearray(size)
            h = xxhash.xxh3_64()
            try:
                yield from piece_copy.copy_hashing(src, memoryview(buf), h)
            except OSError:
                return 0
            if checksum is not None and h.intdigest() != checksum:
                return 0
            block = Block(frames=(buf,), nbytes=size, meta=meta, checksum=checksum)
        else:
            block = Block(frames=(src,), nbytes=size, meta=meta, checksum=checksum)
        stored = yield from self.store.put_steps(key, block, origin)
        self.ops.bytes_in += size
        if isinstance(src, PeerRange):
            self.ops.bytes_in_direct += size
        return int(stored)

    def _batch_copies(self, sizes: list[int]) -> bool:
        """Whether the blocks of a direct put, or of a put from a mapped memfd, are copied
        side by side (TieredStore.put_batch_steps).

        Not with lower tiers (they take their own copy of each block first), nor for a single
        block (a large direct one is split over the copy threads instead), nor for small
        blocks: below BATCH_MIN_BLOCK on average the Python work per block, which holds the
        GIL, costs more than the second thread gains.
        """
        if self.copy_pool is None or self.store.has_lower:
            return False
        blocks = sum(1 for n in sizes if n)
        return blocks > 1 and sum(sizes) >= BATCH_MIN_BLOCK * blocks

    def _put_batch(
        self,
        keys: list[bytes],
        sources: list[Any],
        metas: list[Any],
        sums: list[Any],
        origin: bytes | None,
    ) -> Generator[None, None, int]:
        assert self.copy_pool is not None
        items = [
            (key, Block(frames=(src,), nbytes=src.nbytes, meta=meta, checksum=checksum))
            for key, src, meta, checksum in zip(keys, sources, metas, sums, strict=True)
        ]
        stored = yield from self.store.put_batch_steps(items, self.copy_pool, origin)
        self.ops.bytes_in += sum(src.nbytes for src in sources)
        return sum(stored)

    def put_staged(self, envelope: Any, req: PutRequest) -> Iterator[None]:
        """A same-host put: copy each block from the client's staging file into the arena.

        The CPU tier hashes while it copies and rejects a block whose bytes do not match the
        client's checksum, so a neighbour scribbling on the staging file cannot plant bytes.
        """
        if self.stages is None or req.offsets is None:
            self.reply_error(envelope, req.id, protocol.E_MALFORMED, "shared memory is off")
            return
        try:
            stage = self.stages.get(req.stage or "")
        except ValueError as exc:
            self.reply_error(envelope, req.id, protocol.E_MALFORMED, str(exc))
            return
        metas = req.metas or [None] * len(req.keys)
        # Without checksums (protocol: a memfd and a deadline), the client's own buffer
        # (Client.buffer): trusted as read while the client waits, like a direct put's.
        sums = req.sums if req.sums is not None else [None] * len(req.keys)
        # The connection's routing id: its next flush reports this put's lost lower-tier copies.
        origin = envelope.bytes if self.store.has_lower else None
        with contextlib.ExitStack() as held:
            # A mapped memfd is copied by address, held for the whole put: the stage may be
            # closed meanwhile (its client gone, the LRU full), never unmapped under a copy.
            base = None
            if stage.mapped is not None:
                base = held.enter_context(piece_copy.held_address(stage.mapped))
            batch = base is not None and self._batch_copies(req.sizes)
            # As in put_direct: blocks side by side, or a large block split over the copy
            # threads, memcpy sources too. Through a daemon on a 2-core VM (2026-12-03, four
            # rounds in ABBA order), one 32 MiB block from a buffer took 6.7-7.3 ms a call
            # split against 9.0-9.6 ms on the loop thread alone.
            pool = None if batch else self.copy_pool
            sources = [
                FileRange(stage, off, size, req.until, pool, None if base is None else base + off)
                for off, size in zip(req.offsets, req.sizes, strict=True)
            ]
            if batch:
                stored = yield from self._put_batch(req.keys, sources, metas, sums, origin)
                if req.sums is None:
                    self.ops.bytes_in_buffer += sum(req.sizes)
            else:
                stored = 0
                for key, src, meta, checksum in zip(req.keys, sources, metas, sums, strict=True):
                    yield
                    stored += yield from self._put_one_same_host(key, src, meta, checksum, origin)
                    if req.sums is None:
                        self.ops.bytes_in_buffer += src.nbytes
        self.reply(envelope, PutReply(stored, self.incarnation, id=req.id))

    def op_get(self, envelope: Any, req: GetRequest) -> None:
        if self.arena is not None:
            for lease in req.release:
                self.arena.unpin(lease)
        # Pin the slots with the lookup: nothing can evict and reuse them until the reply's
        # bytes are sent (ZMQ) or the client's lease ends (shared memory).
        if self.arena is not None:
            # A same-host reader gets blocks put over ZMQ from the arena too, from its first
            # read on: each is copied into the slot its entry reserved (CPUBackend.settle).
            cached, pin = self.store.get_cached_pinned(req.keys, self.arena.pin, settle=req.shm)
        else:
            cached, pin = self.store.get_cached_many(req.keys), None
        if not self.store.has_lower or all(b is not None for b in cached):
            self.send_blocks(envelope, req.id, cached, pin, req.shm)
            return
        # Some keys may be on disk or in the remote: look there off the loop, so CPU hits for
        # other clients keep being served meanwhile. The reply goes out when the read is done.
        self._off_loop(
            envelope,
            req,
            lambda: self.store.get_many(req.keys, cached=cached),
            lambda blocks: self.send_blocks(envelope, req.id, blocks, pin, req.shm),
        )

    def _off_loop(
        self,
        envelope: Any,
        req: DataRequest,
        work: Callable[[], Any],
        answer: Callable[[Any], None],
    ) -> None:
        """Run ``work`` on the I/O pool and ``answer`` its result on the loop thread."""

        def done(result: Any, err: BaseException | None) -> None:
            if err is not None:
                self.log.error("request_failed", op=req.op, error=f"{type(err).__name__}: {err}")
                self.reply_error(
                    envelope, req.id, protocol.E_INTERNAL, f"{type(err).__name__}: {err}"
                )
                return
            answer(result)

        self.submit_io(work, done)

    def send_blocks(
        self,
        envelope: Any,
        rid: int,
        blocks: list[Block | None],
        pin: int | None = None,
        shm: bool = False,
    ) -> None:
        """Reply to a get with the found blocks' frames (sent zero-copy), or their slots."""
        # Every get reply passes here, from the loop or from the I/O pool: count retrieve hits.
        self.latency.count_retrieve(len(blocks), sum(1 for b in blocks if b is not None))
        found: list[bool] = []
        sizes: list[int] = []
        metas: list[Any] = []
        sums: list[Any] = []
        frames: list[Any] = []
        slots: list[list[int] | None] = []
        for block in blocks:
            if block is None:
                found.append(False)
                continue
            found.append(True)
            sizes.append(block.nbytes)
            metas.append(block.meta)
            sums.append(block.checksum)
            self.ops.bytes_out += block.nbytes
            if shm and pin is not None and block.slot is not None and self.arena is not None:
                slots.append(self.arena.ref(block.slot).as_list())
                frames.append(())
                self.ops.bytes_out_shared += block.nbytes
            else:
                slots.append(None)
                # An arena block is one slot: sent whole, a 32 MiB block lands in fresh pages on
                # the client (measured over ipc: 0.8-1.2 GB/s, 2.0-2.3 in 16 MiB frames).
                frames.append(block.in_frames_of(self.limits.wire_frame_size))
        if shm and pin is not None:
            # The pin is the client's lease: released by a later get's 'release', or expired.
            arena = self.arena.path if self.arena is not None else None
            reply = GetReply(found, sizes, metas, sums, frames, slots, pin, arena, id=rid)
            self.reply(envelope, reply)
            return
        self.reply(envelope, GetReply(found, sizes, metas, sums, frames, id=rid), pin)

    def op_lookup(self, envelope: Any, req: LookupRequest) -> None:
        def answer(hit: int) -> None:
            self.ops.lookup_keys += len(req.keys)
            self.ops.lookup_hits += hit
            self.reply(envelope, LookupReply(hit, id=req.id))

        hit = self.store.cached_prefix(req.keys)
        if hit == len(req.keys) or not self.store.has_lower:
            answer(hit)
        else:
            self._off_loop(envelope, req, lambda: self.store.lookup(req.keys), answer)

    def op_exists(self, envelope: Any, req: ExistsRequest) -> None:
        def answer(flags: list[bool]) -> None:
            # Client.lookup() is answered with exists; its keys count toward the lookup hit ratio.
            self.ops.lookup_keys += len(flags)
            self.ops.lookup_hits += sum(flags)
            self.reply(envelope, ExistsReply(flags, id=req.id))

        flags = self.store.contains_cached_many(req.keys)
        if all(flags) or not self.store.has_lower:
            answer(flags)
        else:
            self._off_loop(envelope, req, lambda: self.store.exists_many(req.keys), answer)

    def op_delete(self, envelope: Any, req: DeleteRequest) -> None:
        def answer(count: int) -> None:
            self.reply(envelope, DeleteReply(count, id=req.id))

        if not self.store.has_lower:
            answer(self.store.remove_many(req.keys))
        else:
            self._off_loop(envelope, req, lambda: self.store.remove_many(req.keys), answer)

    def op_purge(self, envelope: Any, req: PurgeRequest) -> None:
        def answer(count: int) -> None:
            self.reply(envelope, PurgeReply(count, id=req.id))

        prefix = req.prefix
        if not self.store.has_lower:
            answer(self.store.remove_prefix(prefix))
        else:
            self._off_loop(envelope, req, lambda: self.store.remove_prefix(prefix), answer)

    def op_flush(self, envelope: Any, req: FlushRequest) -> None:
        timeout = min(req.timeout or 30.0, MAX_FLUSH_TIMEOUT_S)
        origin = envelope.bytes

        def answer(done: Any, err: BaseException | None) -> None:
            # Taken after the wait, so a write that failed while we waited is reported too.
            lost = self.store.take_losses(origin)
            reply = FlushReply(
                bool(done) and err is None,
                lost.dropped,
                lost.failed,
                self.incarnation,
                id=req.id,
            )
            self.reply(envelope, reply)

        self.submit_io(lambda: self.store.flush(timeout), answer)

    def op_ping(self, envelope: Any, req: PingRequest) -> None:
        self.reply(envelope, WorkerPingReply(self.worker_id, os.getpid(), id=req.id))

    def op_stats(self, envelope: Any, req: StatsRequest) -> None:
        self.reply(envelope, StatsReply(self.stats(), id=req.id))

    def stats(self) -> dict[str, Any]:
        out = {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "store": self.store.stats(),
            "ops": self.ops.as_dict(),
            "extensions": extension_states(),
            "general_plugins": general_plugin_states(),
            "latency": self.latency.as_dict(),
            "auth": {"refused": self.auth.refused if self.auth is not None else 0},
            # Bytes in use against bytes freed but kept by malloc: a leak grows the first, a
            # transient peak (kept for reuse, see lmcached.malloc) the second.
            "heap": heap_usage() or {},
        }
        for extra in self.stats_extras:
            out.update(extra())
        return out

    # --------------------------------------------------------------------------------- loop
    def serve(self, parent: int) -> None:
        """Serve until stopped, or until ``parent`` (the scheduler's pid) is no longer ours."""
        assert self._router is not None
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        max_held = self.cfg.max_inflight_bytes
        next_sweep = 0.0
        while not self._stop.is_set():
            busy = bool(self._jobs)  # a put in progress: only look for what arrived meanwhile
            try:
                events = dict(poller.poll(0 if busy else POLL_MS))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    break
                raise
            self._release_pins()
            if self._wake_r in events:
                self._drain_completions()
            if self._router in events:
                # Drain what is queued, but keep answering completions between messages. Ask
                # ZMQ_EVENTS before each further read: a recv on an empty socket raises
                # zmq.Again, an exception that costs a lookup's round trip several us.
                for _ in range(64):
                    if self._held_bytes > max_held:
                        break  # libzmq keeps the rest until the put in progress ends
                    try:
                        frames = self.receive()
                    except zmq.Again:
                        break
                    if frames is not None:
                        self.handle_message(frames)
                    if not cast(int, self._router.get(_EVENTS)) & _POLLIN:
                        break
            if self._jobs:
                self._step_jobs()
            elif not busy and not events and os.getppid() != parent:
                self.log.warning("scheduler_gone", parent=parent)
                break
            if not events and (not busy or time.monotonic() >= next_sweep):
                # Let go of the staging areas their clients closed or left, and of the peers
                # of clients that exited (a memfd's pages stay alive, and count in this
                # process's memory, while we map it).
                # Between a put's slices at most once a second: a sweep costs a system call
                # per client, and a long put has a slice every 2 ms.
                next_sweep = time.monotonic() + BUSY_SWEEP_S
                if self.stages is not None:
                    self.stages.forget_released()
                if self.peers is not None:
                    self.peers.forget_dead()
            if not events and not busy:
                self._trim_when_idle()

    def _trim_when_idle(self) -> None:
        """Give the heap's free memory back once the worker is idle after serving requests.

        glibc keeps freed memory for the next large message (lmcached.malloc: up to its trim
        threshold, 512 MiB), which is what keeps a burst of ZMQ puts off fresh pages. Kept past
        the burst, it is no cache's and no budget's: four clients putting over ZMQ left an
        idle worker 0.3 to 0.4 GiB above its 1 GiB CPU budget. So after an idle poll that
        follows requests, a heap with more than IDLE_KEPT_FREE free is trimmed: ~50 ms to
        give back 0.7 GiB, 0.2 ms when there is nothing to give.
        """
        if not self._served_since_trim:
            return
        self._served_since_trim = False
        heap = heap_usage()
        if heap is not None and heap["free"] > IDLE_KEPT_FREE:
            release_free_memory()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_jobs()
        if self._io_pool is not None:
            self._io_pool.shutdown(wait=True, cancel_futures=False)
        self._drain_completions()
        if self.stages is not None:
            self.stages.close()
        if self.peers is not None:
            self.peers.close()
        if self.copy_pool is not None:
            self.copy_pool.shutdown(wait=True)  # jobs were dropped: every copy has ended
        self.store.close()
        if self.auth is not None:
            self.auth.stop()
        if self._router is not None:
            ipc = self.endpoints.get("ipc", "")
            self._router.close(linger=0)
            with contextlib.suppress(OSError):
                os.unlink(ipc[len("ipc://") :])
        self._ctx.term()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcached-worker")
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--worker-id", type=int, required=True)
    parser.add_argument("--internal", required=True, help="scheduler's internal endpoint")
    parser.add_argument("--daemon-id", required=True, help="the scheduler's id, stamped on replies")
    parser.add_argument("--parent-pid", type=int, required=True, help="the scheduler's pid")
    args = parser.parse_args(argv)
    # The scheduler armed our death signal before exec; if it died before that, we were
    # re-parented and the signal will never come.
    if os.getppid() != args.parent_pid:
        return 1
    protocol.REPLY_STAMP["d"] = args.daemon_id
    tune_for_large_messages(daemon=True)
    with open(args.config_json) as f:
        cfg = config_mod.from_mapping(json.load(f), environ={})
    try:
        return _run(cfg, args)
    except Exception as exc:  # a failed start: its reason for the scheduler, its trace in the log
        _record_start_error(cfg, args.worker_id, exc)
        logs.get_logger("lmcached.daemon.worker").exception("worker_start_failed")
        return 1


def _record_start_error(cfg: config_mod.Config, worker_id: int, exc: BaseException) -> None:
    """Leave the one-line reason of a failed start where the scheduler reads it when it gives
    up (worker_start_attempts); the full traceback is in this worker's log."""
    path = os.path.join(cfg.instance_dir, f"worker-{worker_id}.start-error")
    line = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(line + "\n")


def _run(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    logs.configure("worker", args.worker_id, cfg.log_level, cfg.log_format)
    log = logs.get_logger("lmcached.daemon.worker")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scheduler decides when workers stop
    try:
        # vLLM's rule: general plugins run first in every process, here before the store is
        # built, so that one may register a codec or policy this worker's store then uses.
        run_general_plugins(
            ProcessInfo("worker", args.worker_id, cfg.source), strict=cfg.strict_plugins
        )
        worker = Worker(cfg, args.worker_id)
    except PluginStartupError as exc:  # strict_plugins: the scheduler stops the daemon
        log.error("plugin_start_failed", error=str(exc))
        return EXIT_PLUGIN_FATAL
    except ConfigError as exc:  # the store cannot be built: restarting will not help
        log.error("config_invalid", error=str(exc), hint="run `lmcached config check`")
        return EXIT_CONFIG_INVALID
    plugins = WorkerPlugins(worker, args.config_json)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    serving = False
    try:
        endpoints = worker.bind()
        plugins.start()
        worker.register(args.internal)
        log.info("worker_ready", endpoints=endpoints, version=__version__)
        # What start-up made lives as long as the process: no collection needs to walk it.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        serving = True
        worker.serve(args.parent_pid)
    except Exception as exc:
        log.exception("worker_failed")
        if not serving:
            _record_start_error(cfg, args.worker_id, exc)
        return 1
    finally:
        plugins.stop()
        worker.close()
    log.info("worker_stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
