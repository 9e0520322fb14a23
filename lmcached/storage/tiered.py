"""The TieredStore: one per worker, owning the policy across tiers.

- Lookup order is the order of ``tiers``: CPU first, then disk, then remote.
- A hit in a lower tier is promoted into CPU (and a remote hit is also queued for disk).
- A put is acknowledged once it is in CPU. Lower tiers are written by one bounded
  :class:`~lmcached.storage.writequeue.WriteQueue` each (write-through), or only when CPU evicts
  a block (write-back). A full queue drops the write and counts it; it never blocks.
- ``flush`` waits for the queues and reports the copies of the caller's puts that were dropped
  or failed (:class:`LossLedger`); ``close`` drains them, bounded by ``shutdown_flush_timeout``.
- ``remove``/``remove_prefix`` reach every tier, and cancel queued writes of the keys.
- Deletes are final: every put and delete stamps the key with a new generation, and a get that
  read a lower tier promotes its block only if the key was not stamped since the get began, so a
  read in flight never brings back a key deleted (or replaced) meanwhile.

Thread safety: every method may be called from any thread. The worker's request loop calls the
CPU-only methods (``get_cached_many``, ``put``) inline and sends everything that may touch a lower
tier through ``Worker.submit_io``, so a slow disk or remote never delays a CPU hit. The CPU tier
is not thread-safe itself, so it is guarded here by one lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Executor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog

from lmcached.storage.base import Block, StorageBackend
from lmcached.storage.latency import LatencyStat
from lmcached.storage.writequeue import WriteQueue

log = structlog.get_logger("lmcached.storage.tiered")

WRITE_POLICIES = ("write-through", "write-back")


@dataclass(frozen=True, slots=True)
class FlushLosses:
    """Copies of one origin's puts that never reached a lower tier, since its last flush."""

    dropped: int = 0  # a full write queue (or shutdown) dropped the copy
    failed: int = 0  # the tier's write failed or rejected the block


class LossLedger:
    """Count lost lower-tier copies per origin (client connection) until it flushes.

    Bounded: past ``max_origins`` the origin that lost something longest ago is forgotten (a
    client that never flushes must not grow the worker); ``forgotten`` counts them.
    """

    def __init__(self, max_origins: int = 4096) -> None:
        self.max_origins = max_origins
        self._counts: OrderedDict[bytes, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self.forgotten = 0

    def record(self, origin: bytes, kind: str) -> None:
        with self._lock:
            counts = self._counts.get(origin)
            if counts is None:
                counts = self._counts[origin] = [0, 0]
                while len(self._counts) > self.max_origins:
                    self._counts.popitem(last=False)
                    self.forgotten += 1
            counts[0 if kind == "dropped" else 1] += 1

    def take(self, origin: bytes) -> FlushLosses:
        """Return and reset what ``origin`` lost."""
        with self._lock:
            counts = self._counts.pop(origin, None)
        return FlushLosses() if counts is None else FlushLosses(counts[0], counts[1])


class Generations:
    """Per-key stamps of the last put or delete, kept only while some lower-tier get may care.

    A get takes a ticket (the current generation) before it reads a lower tier; a stamp newer
    than the ticket means the key changed meanwhile. Stamps older than every open ticket can no
    longer matter and are pruned, so the map stays as small as the gets in flight need.
    """

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._now = 0
        self._stamps: OrderedDict[bytes, int] = OrderedDict()  # oldest stamp first
        self._open: dict[int, int] = {}  # ticket id -> generation at its start
        self._ids = itertools.count()

    # Callers hold the TieredStore's CPU lock around every method.
    def stamp(self, key: bytes) -> None:
        if not self._open:
            return  # no get in flight: nobody can be overtaken
        self._now = next(self._counter)
        self._stamps[key] = self._now
        self._stamps.move_to_end(key)

    def open(self) -> int:
        ticket = next(self._ids)
        self._open[ticket] = self._now
        return ticket

    def changed_since(self, ticket: int, key: bytes) -> bool:
        return self._stamps.get(key, 0) > self._open[ticket]

    def close(self, ticket: int) -> None:
        del self._open[ticket]
        oldest = min(self._open.values(), default=self._now)
        while self._stamps:
            key, gen = next(iter(self._stamps.items()))
            if gen > oldest:
                break
            del self._stamps[key]

    def __len__(self) -> int:
        return len(self._stamps)


class _Claims:
    """Indices handed out once each, in order, to whichever thread asks first."""

    def __init__(self, indices: list[int]) -> None:
        self._left = indices[::-1]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._left)

    def take(self) -> int | None:
        with self._lock:
            return self._left.pop() if self._left else None

    def clear(self) -> None:
        with self._lock:
            self._left.clear()


class _Copied:
    """Which blocks of a batch are copied, for the thread that publishes them in order."""

    __slots__ = ("_changed", "done")

    def __init__(self, n: int) -> None:
        self.done = [False] * n
        self._changed = threading.Condition(threading.Lock())

    def mark(self, index: int) -> None:
        with self._changed:
            self.done[index] = True
            self._changed.notify_all()

    def wait(self, index: int) -> None:
        if self.done[index]:
            return
        with self._changed:
            while not self.done[index]:
                self._changed.wait()


class TieredStore:
    """Route gets, puts and deletes across an ordered list of tiers (CPU first)."""

    def __init__(
        self,
        tiers: Sequence[StorageBackend],
        *,
        write_policy: str = "write-through",
        queue_max_bytes: int = 512 << 20,
        queue_max_items: int = 4096,
        shutdown_flush_timeout: float = 10.0,
        max_frame_size: int = 16 << 20,
    ) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        if write_policy not in WRITE_POLICIES:
            raise ValueError(
                f"unknown write_policy {write_policy!r}; known: {', '.join(WRITE_POLICIES)}"
            )
        if write_policy == "write-back" and len(tiers) > 1 and not hasattr(tiers[0], "on_evict"):
            raise ValueError(
                "write_policy write-back needs a first tier that reports its evictions; "
                f"{type(tiers[0]).__name__} does not"
            )
        self.tiers = list(tiers)
        self.write_policy = write_policy
        self.shutdown_flush_timeout = shutdown_flush_timeout
        self.max_frame_size = max_frame_size
        self._cpu_lock = threading.RLock()
        self._get_latency = {t.name: LatencyStat() for t in self.tiers}
        self._put_latency = {t.name: LatencyStat() for t in self.lower}
        self.losses = LossLedger()
        self._generations = Generations()
        # Keys whose delete is under way (count of deletes): until the lower tiers forgot them,
        # a get may still read them there, so nothing promotes them meanwhile.
        self._deleting: dict[bytes, int] = {}
        self.queues = {
            t.name: WriteQueue(
                t.name,
                self._writer_for(t),
                max_bytes=queue_max_bytes,
                max_items=queue_max_items,
                idle_hook=getattr(t, "upkeep", None),
                on_loss=self.losses.record,
            )
            for t in self.lower
        }
        if write_policy == "write-back" and self.lower:
            self.top.on_evict = self._write_back  # type: ignore[attr-defined]
        self._closed = False

    # --- structure --------------------------------------------------------------------------

    @property
    def top(self) -> StorageBackend:
        return self.tiers[0]

    @property
    def lower(self) -> list[StorageBackend]:
        return self.tiers[1:]

    @property
    def has_lower(self) -> bool:
        """True when some lookups must leave memory (the worker then goes through submit_io)."""
        return len(self.tiers) > 1

    def tier(self, name: str) -> StorageBackend | None:
        return next((t for t in self.tiers if t.name == name), None)

    def _writer_for(
        self, tier: StorageBackend
    ) -> Callable[[Sequence[tuple[bytes, Block]]], list[bool]]:
        latency = self._put_latency[tier.name]

        def write(batch: Sequence[tuple[bytes, Block]]) -> list[bool]:
            start = time.perf_counter()
            results = tier.put_many(batch)
            latency.record(time.perf_counter() - start)
            return results

        return write

    # --- puts -------------------------------------------------------------------------------

    def put(self, key: bytes, block: Block, origin: bytes | None = None) -> bool:
        """Store in CPU and queue the lower-tier copies; True when stored or queued somewhere.

        ``origin`` names the caller (its connection), whose next flush reports lost copies.
        """
        with self._cpu_lock:
            self._generations.stamp(key)
            stored = self.top.put(key, block)
        return self._offer_down(key, block, origin, stored)

    def _offer_down(self, key: bytes, block: Block, origin: bytes | None, stored: bool) -> bool:
        if self.write_policy == "write-through" or not stored:
            # Write-back still sends a block that CPU refused (too big, no CPU budget) down.
            for q in self.queues.values():
                stored = q.offer(key, block, origin) or stored
        return stored

    def put_steps(
        self, key: bytes, block: Block, origin: bytes | None = None, keep_buffers: bool = False
    ) -> Generator[None, None, bool]:
        """``put``, yielding between the pieces of a large block's copy into the CPU arena.

        The worker's loop serves other requests at each yield, so one large put does not hold
        it for the whole copy. Returns what ``put`` returns. Closing the generator early gives
        the reserved slot back; the block is then stored nowhere. ``keep_buffers``: the CPU
        tier keeps the block's buffers as they are (see CPUBackend.start_put).
        """
        start = getattr(self.top, "start_put", None)
        if start is None:
            return self.put(key, block, origin)
        with self._cpu_lock:
            self._generations.stamp(key)
            started = start(key, block, keep_buffers)
        if isinstance(started, bool):
            stored = started
        else:
            try:
                while started.step():
                    yield
                with self._cpu_lock:
                    # Again at the end: a get that began during the copy and read an older copy
                    # in a lower tier must not promote it over this one.
                    self._generations.stamp(key)
                    stored = started.finish()
            except BaseException:
                with self._cpu_lock:
                    started.abort()
                raise
        return self._offer_down(key, block, origin, stored)

    def put_batch_steps(
        self, items: Sequence[tuple[bytes, Block]], pool: Executor, origin: bytes | None = None
    ) -> Generator[None, None, list[bool]]:
        """``put_steps`` for several blocks, copied by the calling thread and one of ``pool``'s.

        For same-host sources, which copy with the GIL released. Each block is copied and
        hashed whole by one thread: the caller and the helper each take the next block not yet
        taken, so both cores copy while a core is free, and the caller does it all while none
        is (no guess about the load). Every slot is reserved first; each block is published in
        order once copied, yielding between pieces and blocks. Returns, per block, what
        ``put`` returns. Closing the generator early stops the copies between pieces, waits
        for the helper, and gives the slots back.
        """
        start = getattr(self.top, "start_put", None)
        if start is None:
            return [self.put(key, block, origin) for key, block in items]
        stored: list[bool] = [False] * len(items)
        writes: list[Any] = [None] * len(items)
        todo = _Claims([])
        # Which blocks are copied: one condition for the put, not an Event per block (an Event
        # is a Condition and a lock; 16 of them cost ~90 us a put, more than the signalling).
        copied = _Copied(len(items))
        failures: dict[int, BaseException] = {}

        def help_copy() -> None:
            while (j := todo.take()) is not None:
                try:
                    writes[j].copy_all()
                except BaseException as exc:  # re-raised in order by the caller
                    failures[j] = exc
                finally:
                    copied.mark(j)

        helper = None
        try:
            with self._cpu_lock:
                for i, (key, block) in enumerate(items):
                    self._generations.stamp(key)
                    started = start(key, block, defer=True)
                    if isinstance(started, bool):
                        stored[i] = started
                    else:
                        writes[i] = started
            todo = _Claims([i for i, w in enumerate(writes) if w is not None])
            helper = pool.submit(help_copy) if len(todo) > 1 else None
            for i, write in enumerate(writes):
                if write is None:
                    continue
                while not copied.done[i] and (j := todo.take()) is not None:
                    while writes[j].step():
                        yield
                    copied.mark(j)
                copied.wait(i)
                if i in failures:
                    raise failures[i]
                with self._cpu_lock:
                    # As in put_steps: a get that began during the copy must not promote an
                    # older copy over this one.
                    self._generations.stamp(items[i][0])
                    stored[i] = write.finish()
                yield
        except BaseException:
            todo.clear()
            for write in writes:
                if write is not None:
                    write.cancelled = True
            if helper is not None:
                wait([helper])  # no copy may still write into a slot we give back
            with self._cpu_lock:
                for write in writes:
                    if write is not None:
                        write.abort()
            raise
        return [
            self._offer_down(key, block, origin, ok)
            for (key, block), ok in zip(items, stored, strict=True)
        ]

    def _write_back(self, key: bytes, block: Block) -> None:
        # Called under the CPU lock when CPU evicts: the block's last chance to reach a lower tier.
        for q in self.queues.values():
            q.offer(key, block)

    # --- gets -------------------------------------------------------------------------------

    def get_cached_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        """Look in CPU only (never blocks on I/O; safe on the request loop)."""
        start = time.perf_counter()
        with self._cpu_lock:
            out = [self.top.get(k) for k in keys]
        self._get_latency[self.top.name].record(time.perf_counter() - start)
        return out

    def get_cached_pinned(
        self, keys: Sequence[bytes], pin: Callable[[list[int]], int], settle: bool = False
    ) -> tuple[list[Block | None], int | None]:
        """Look in CPU only, and pin the found blocks' arena slots in the same critical section.

        ``pin`` (the arena's) is called with the slots under the CPU lock, so a promotion on an
        I/O thread cannot evict and reuse a slot between the lookup and the pin. ``settle``
        (a same-host reader): first move the found blocks that a ZMQ put left in their own
        buffers into their slots (CPUBackend.settle). Returns the blocks and the pin id (None
        when no block lives in an arena slot).
        """
        start = time.perf_counter()
        with self._cpu_lock:
            if settle and hasattr(self.top, "settle"):
                self.top.settle(keys)
            out = [self.top.get(k) for k in keys]
            slots = [b.slot for b in out if b is not None and b.slot is not None]
            held = pin(slots) if slots else None
        self._get_latency[self.top.name].record(time.perf_counter() - start)
        return out, held

    def get_many(
        self, keys: Sequence[bytes], cached: Sequence[Block | None] | None = None
    ) -> list[Block | None]:
        """Look in every tier in order and promote lower-tier hits into CPU.

        ``cached`` is the result of an earlier ``get_cached_many(keys)``, so the worker does not
        count its CPU misses twice. May block on disk and network: call it off the request loop.
        """
        out = list(cached) if cached is not None else self.get_cached_many(keys)
        with self._ticket() as ticket:
            # A block CPU no longer holds may still be queued for its lower-tier copies.
            for i, block in enumerate(out):
                if block is None:
                    out[i] = self._queued(keys[i])
            for level, tier in enumerate(self.lower, start=1):
                missing = [i for i, b in enumerate(out) if b is None]
                if not missing:
                    break
                start = time.perf_counter()
                found = tier.get_many([keys[i] for i in missing])
                self._get_latency[tier.name].record(time.perf_counter() - start)
                for i, block in zip(missing, found, strict=True):
                    if block is not None:
                        block = self._as_wire_frames(block)
                        out[i] = block
                        self._promote(keys[i], block, level, ticket)
        return out

    @contextmanager
    def _ticket(self) -> Iterator[int]:
        with self._cpu_lock:
            ticket = self._generations.open()
        try:
            yield ticket
        finally:
            with self._cpu_lock:
                self._generations.close(ticket)

    def get(self, key: bytes) -> Block | None:
        return self.get_many([key])[0]

    def _queued(self, key: bytes) -> Block | None:
        for q in self.queues.values():
            block = q.peek(key)
            if block is not None:
                return block
        return None

    def _as_wire_frames(self, block: Block) -> Block:
        """Split a block read from disk or remote into frames of at most max_frame_size.

        Blocks from the client arrive in such sub-frames already. A 32 MiB single frame would
        make the client's libzmq allocate 32 MiB at once, above glibc's mmap threshold: a fresh
        mapping and ~8k page faults per read (the "32 MiB cliff"). The views cost no copy.
        """
        frames = block.in_frames_of(self.max_frame_size)
        if frames is block.frames:
            return block
        return Block(frames=frames, nbytes=block.nbytes, meta=block.meta, checksum=block.checksum)

    def _promote(self, key: bytes, block: Block, level: int, ticket: int) -> None:
        with self._cpu_lock:
            if (
                key in self._deleting
                or self._generations.changed_since(ticket, key)
                or self.top.contains(key)
            ):
                return  # deleted or put again while we read: the older copy must not return
            self.top.put(key, block)
            # Tiers between CPU and the one that hit (disk, for a remote hit) get a copy as
            # well; queued under the lock, so a delete's cancel that follows always sees it.
            for tier in self.lower[: level - 1]:
                self.queues[tier.name].offer(key, block)

    # --- existence --------------------------------------------------------------------------

    def contains_cached(self, key: bytes) -> bool:
        with self._cpu_lock:
            return self.top.contains(key)

    def contains_cached_many(self, keys: Sequence[bytes]) -> list[bool]:
        """``contains_cached`` of each key under one lock (a lookup asks about 100s of keys)."""
        contains = self.top.contains
        with self._cpu_lock:
            return [contains(k) for k in keys]

    def cached_prefix(self, keys: Sequence[bytes]) -> int:
        """Return how many leading keys the CPU tier holds, under one lock."""
        with self._cpu_lock:
            return self.top.contained_prefix(keys)

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Return, per key, whether any tier holds it (may block: call it off the loop)."""
        with self._cpu_lock:
            out = [self.top.contains(k) for k in keys]
        out = [hit or self._queued(k) is not None for hit, k in zip(out, keys, strict=True)]
        for tier in self.lower:
            missing = [i for i, hit in enumerate(out) if not hit]
            if not missing:
                break
            for i, hit in zip(missing, tier.contains_many([keys[i] for i in missing]), strict=True):
                out[i] = hit
        return out

    def contains(self, key: bytes) -> bool:
        return self.exists_many([key])[0]

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Return how many leading keys are stored in some tier (may block: off the loop)."""
        flags = self.exists_many(keys)
        return next((i for i, hit in enumerate(flags) if not hit), len(flags))

    # --- deletes ----------------------------------------------------------------------------

    def remove_many(self, keys: Sequence[bytes]) -> int:
        """Delete ``keys`` from every tier; return how many distinct keys were present."""
        keys = list(dict.fromkeys(keys))
        with self._cpu_lock:
            for k in keys:
                self._deleting[k] = self._deleting.get(k, 0) + 1  # no promotion of k from now
            present = [self.top.remove(k) for k in keys]
        try:
            # Then cancel queued copies (a promotion's included), so no pending write re-creates
            # a key after its delete.
            for q in self.queues.values():
                q.cancel(keys)
            for tier in self.lower:
                for i, hit in enumerate(tier.remove_many(keys)):
                    present[i] = present[i] or hit
        finally:
            with self._cpu_lock:
                for k in keys:
                    # Gets that began before this point may hold a copy read from a lower tier:
                    # the stamp makes their promotion a no-op.
                    self._generations.stamp(k)
                    left = self._deleting[k] - 1
                    if left:
                        self._deleting[k] = left
                    else:
                        del self._deleting[k]
        return sum(present)

    def remove(self, key: bytes) -> bool:
        return self.remove_many([key]) > 0

    def remove_prefix(self, prefix: bytes) -> int:
        """Delete every key under ``prefix`` from every tier; return distinct keys removed.

        The remote tier contributes only the keys this worker owns (see
        RemoteBackend.keys_with_prefix), so a purge fanned out to every worker counts each
        shared key once.
        """
        with self._cpu_lock:
            victims = {k for k in self.top.iter_keys() if k.startswith(prefix)}
        for tier in self.lower:
            victims.update(tier.keys_with_prefix(prefix))
        return self.remove_many(sorted(victims)) if victims else 0

    # --- lifecycle --------------------------------------------------------------------------

    def take_losses(self, origin: bytes) -> FlushLosses:
        """Return (and reset) the lost lower-tier copies of ``origin``'s puts since its last call."""
        return self.losses.take(origin)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write queue is empty; True when all drained before ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ok = True
        for q in self.queues.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = q.flush(left) and ok
        return ok

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tier in self.tiers:
            s = dict(tier.stats())
            s.setdefault("checksum_failures", 0)
            s["get_latency"] = self._get_latency[tier.name].as_dict()
            if tier.name in self.queues:
                s["queue"] = self.queues[tier.name].stats()
                s["queue_drops"] = s["queue"]["queue_drops"]
                s["put_latency"] = self._put_latency[tier.name].as_dict()
            out[tier.name] = s
        return out

    def close(self, timeout: float | None = None) -> bool:
        """Drain the write queues (at most ``timeout``, default shutdown_flush_timeout), then
        close every tier. Idempotent. Returns True when nothing queued was lost."""
        if self._closed:
            return True
        self._closed = True
        budget = self.shutdown_flush_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        if self.write_policy == "write-back" and self.queues:
            self._write_back_all(deadline)
        drained = True
        for name, q in self.queues.items():
            left = max(0.0, deadline - time.monotonic())
            if not q.close(left):
                drained = False
                log.warning("write queue not drained at shutdown", tier=name, **q.stats())
        for tier in self.tiers:
            tier.close()
        return drained

    def _write_back_all(self, deadline: float) -> None:
        # Write-back keeps the only copy in CPU; at shutdown copy what fits in the time left.
        with self._cpu_lock:
            keys = list(self.top.iter_keys())
        for key in keys:
            with self._cpu_lock:
                block = self.top.get(key)
            if block is None:
                continue
            for q in self.queues.values():
                # A full queue is waited on here (shutdown, not the request loop), within budget.
                while not q.offer(key, block):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    q.flush(min(0.5, left))
