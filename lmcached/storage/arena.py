"""A worker's shared-memory arena: the file, a buddy allocator over it, and pins.

The CPU tier keeps every block's bytes in a slot of this arena (see :mod:`lmcached.shm.layout`
for the layout and the generation rules that clients rely on). The allocator is a binary buddy
allocator: a block takes the smallest power-of-two slot (at least MIN_SLOT bytes) that holds it,
and a freed slot merges with its free buddy, so freeing and allocating cost O(log size) and the
arena never needs compaction.

A slot that is being read (a ZMQ reply still queued in libzmq, or a client holding a lease on a
zero-copy view) is *pinned*: removing its block from the tier makes it a zombie, and its bytes
are reused only once every pin is released or has expired. A pin expires after the lease
timeout, so a client that never releases cannot hold memory for ever.

The arena file is created with mode 0640 and the ipc sockets' group: whoever may use the ipc
socket may map it, read-only. Clients never write it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import itertools
import mmap
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmcached.runtime import pid_alive
from lmcached.security import resolve_group
from lmcached.shm.files import create_mapped
from lmcached.shm.layout import (
    ARENA_PREFIX,
    INDEX_BUCKET,
    INDEX_FINAL_MISSES,
    INDEX_FLAGS_AT,
    INDEX_LIVE,
    INDEX_RETIRED,
    INDEX_STATE_AT,
    INDEX_WAYS,
    MEMFD_STAGE_PREFIX,
    STAGE_PREFIX,
    ArenaHeader,
    SlotRef,
    arena_file_name,
    fingerprint,
    instance_tag,
    pack_descriptor,
    pack_generation,
    parse_memfd_stage,
    retire_arena,
)

__all__ = [
    "ENTRY_OVERHEAD",
    "MIN_SLOT",
    "Arena",
    "FileRange",
    "Stage",
    "StageMaps",
    "arena_dir",
    "instance_tag",
    "slot_size",
]

MIN_SLOT = 64
_MIN_ORDER = MIN_SLOT.bit_length() - 1
_PAGE_ORDER = mmap.PAGESIZE.bit_length() - 1
# What one stored entry costs besides its slot, key and meta: its descriptor, the index entry,
# the Block and its view, the eviction policy's node. It also bounds the descriptor count.
# Measured, not estimated: a stream of 0-byte blocks (no meta) on a 64 MiB budget grew a worker's
# heap by about 1.1 KiB per entry beyond its key (1.6 KiB with 512-byte keys); at 512 the
# worker reached budget + 122 MiB. 1536 keeps such a stream within budget + 64 MiB.
ENTRY_OVERHEAD = 1536
ARENA_MODE = 0o640


def slot_size(nbytes: int) -> int:
    """Bytes the allocator reserves for a payload of ``nbytes`` (0 for an empty block)."""
    if nbytes <= 0:
        return 0
    return max(MIN_SLOT, 1 << (nbytes - 1).bit_length())


def arena_dir() -> str:
    """Where arenas live: /dev/shm when usable (tmpfs), else the system temp folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    import tempfile

    return tempfile.gettempdir()


@dataclass(slots=True)
class _Slot:
    offset: int
    order: int  # -1 for an empty block (no payload bytes)
    length: int
    generation: int
    pins: int = 0
    zombie: bool = False


class Arena:
    """One worker's arena: allocate, commit, free and pin slots. Thread-safe."""

    def __init__(
        self,
        directory: str,
        tag: str,
        worker_id: int,
        data_size: int,
        descriptors: int,
        group: str | None = None,
        lease_timeout: float = 30.0,
    ) -> None:
        self.lease_timeout = lease_timeout
        remove_stale(directory, tag, worker_id)
        nonce = secrets.token_bytes(16)
        data_size = max(data_size, MIN_SLOT) // MIN_SLOT * MIN_SLOT
        self.header = ArenaHeader.plan(data_size, max(descriptors, 1), nonce)
        self.path = os.path.join(directory, arena_file_name(tag, worker_id, nonce.hex()))

        def set_group(fd: int) -> None:
            if group is not None:
                os.fchown(fd, -1, resolve_group(group))

        # A sparse file: tmpfs gives pages only when written. Never truncated afterwards, so
        # a client's mapping never faults (SIGBUS) whatever happens to this process.
        self._map = create_mapped(self.path, self.header.file_size, ARENA_MODE, set_group)
        self._map[: len(self.header.pack())] = self.header.pack()
        # Held for this process's life: clients trust the presence index only while it is held,
        # and the kernel drops it when the worker dies, however it dies.
        self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.view = memoryview(self._map)
        self._lock = threading.Lock()
        # Free slots by order (log2 of their size); the largest order ever carved bounds merging.
        self._free: list[set[int]] = [set() for _ in range(64)]
        self._top_order = _MIN_ORDER
        self._carve(data_size)
        self._slots: dict[int, _Slot] = {}
        self._free_desc: list[int] = []
        self._next_desc = 0
        self._generation = itertools.count(2, 2)
        self._pins: dict[int, tuple[list[int], float]] = {}
        self._expiry: list[tuple[float, int]] = []
        self._pin_ids = itertools.count(1)
        self.slot_bytes = 0
        # The end of the highest slot ever handed out to be written: tmpfs has no pages above.
        self._written_end = 0
        self.zombies = 0
        self._closed = False
        # The presence index, as u64 words; keys that found no free way in either bucket (a
        # miss in the index is not final while there is one).
        h = self.header
        self._index = self.view[
            h.index_offset : h.index_offset + h.index_buckets * INDEX_BUCKET
        ].cast("Q")
        self._index_mask = h.index_buckets - 1
        self._unindexed: set[bytes] = set()
        self._final_misses = False
        self._set_word(INDEX_FLAGS_AT, 0)
        self._set_word(INDEX_STATE_AT, INDEX_LIVE)

    # ------------------------------------------------------------------------- buddy allocator
    def _carve(self, size: int) -> None:
        """Cut the payload area into the largest aligned power-of-two blocks that fit."""
        pos = 0
        while size - pos >= MIN_SLOT:
            order = _MIN_ORDER
            while pos % (1 << (order + 1)) == 0 and pos + (1 << (order + 1)) <= size and order < 40:
                order += 1
            self._free[order].add(pos)
            self._top_order = max(self._top_order, order)
            pos += 1 << order

    def _alloc_order(self, order: int, high: bool = False) -> int | None:
        k = order
        while k < len(self._free) and not self._free[k]:
            k += 1
        if k >= len(self._free):
            return None
        # The lowest free offset: reuse pages tmpfs already gave us (a first touch costs a fault
        # and a zeroed page), and keep the high end of the arena untouched. A reservation that
        # will never be written takes the highest, where pages are least likely to be backed.
        off = max(self._free[k]) if high else min(self._free[k])
        self._free[k].discard(off)
        while k > order:
            k -= 1
            half = 1 << k
            if high:
                self._free[k].add(off)
                off += half
            else:
                self._free[k].add(off + half)
        return off

    def _free_order(self, off: int, order: int) -> None:
        while order < self._top_order:
            buddy = off ^ (1 << order)
            if buddy not in self._free[order]:
                break
            self._free[order].discard(buddy)
            off = min(off, buddy)
            order += 1
        self._free[order].add(off)

    # ------------------------------------------------------------------------------ slots
    def alloc(self, nbytes: int, unbacked: bool = False) -> int | None:
        """Reserve a slot for ``nbytes``; return its descriptor index, or None when full.

        ``unbacked``: the slot only holds its place (the block's bytes live elsewhere): it is
        taken from the high end of the arena and its pages are given back to the kernel, so
        the arena's resident pages and the bytes held elsewhere stay within one budget.
        """
        with self._lock:
            if self._free_desc:
                index = self._free_desc.pop()
            elif self._next_desc < self.header.descriptors:
                index = self._next_desc
                self._next_desc += 1
            else:
                return None
            if nbytes > 0:
                order = max(_MIN_ORDER, (nbytes - 1).bit_length())
                off = self._alloc_order(order, high=unbacked)
                if off is None:
                    self._free_desc.append(index)
                    return None
                self.slot_bytes += 1 << order
                if not unbacked:
                    self._written_end = max(self._written_end, off + (1 << order))
                elif order >= _PAGE_ORDER and off < self._written_end:
                    # Slots are aligned to their size, so a slot of a page or more covers whole
                    # pages; tmpfs frees them. Above every slot ever written there is nothing
                    # to free, so the system call is spared. An arena outside tmpfs (no
                    # /dev/shm) may not support it: its pages then stay, as a freed slot's do.
                    with contextlib.suppress(OSError):
                        self._map.madvise(
                            mmap.MADV_REMOVE, self.header.data_offset + off, 1 << order
                        )
            else:
                off, order = 0, -1
            self._slots[index] = _Slot(off, order, nbytes, 0)
            return index

    def back(self, index: int) -> None:
        """Mark an unbacked slot as about to be written (its block moves into the arena).

        Its pages are then the arena's like any written slot's, and a later unbacked
        reservation of this range gives them back.
        """
        with self._lock:
            s = self._slots[index]
            if s.order >= 0:
                self._written_end = max(self._written_end, s.offset + (1 << s.order))

    def payload(self, index: int) -> memoryview:
        """The writable bytes of a slot (worker only)."""
        s = self._slots[index]
        start = self.header.data_offset + s.offset
        return self.view[start : start + s.length]

    def commit(self, index: int, checksum: int) -> None:
        """Publish a slot whose bytes are written: its descriptor gets a new generation, last."""
        with self._lock:
            s = self._slots[index]
            s.generation = next(self._generation)
            at = self.header.descriptor_at(index)
            # Offset, length and checksum first; the generation that makes them valid last.
            self._map[at + 8 : at + 32] = pack_descriptor(0, s.offset, s.length, checksum)[8:]
            self._map[at : at + 8] = pack_generation(s.generation)

    def ref(self, index: int) -> SlotRef:
        s = self._slots[index]
        return SlotRef(index, s.generation, s.offset, s.length)

    def release(self, index: int) -> None:
        """Forget a slot's block; its bytes are reused once no pin holds them."""
        with self._lock:
            s = self._slots.get(index)
            if s is None or s.zombie:
                return
            if s.pins:
                # Readers hold it: its bytes and generation stay valid until the last pin goes.
                s.zombie = True
                self.zombies += 1
            else:
                self._reclaim(index, s)

    def _reclaim(self, index: int, s: _Slot) -> None:
        # Odd generation first: from now on no reader accepts what it reads here; only then
        # may the bytes and the descriptor be reused.
        at = self.header.descriptor_at(index)
        self._map[at : at + 8] = pack_generation(s.generation | 1)
        del self._slots[index]
        if s.order >= 0:
            self._free_order(s.offset, s.order)
            self.slot_bytes -= 1 << s.order
        self._free_desc.append(index)

    # ---------------------------------------------------------------------- presence index
    def _set_word(self, at: int, value: int) -> None:
        self._map[at : at + 8] = value.to_bytes(8, "little")

    def _ways(self, fp: int) -> tuple[int, int]:
        first = (fp & self._index_mask) * INDEX_WAYS
        second = ((fp >> 32) & self._index_mask) * INDEX_WAYS
        return first, second

    def index_key(self, key: bytes) -> None:
        """Publish ``key`` in the presence index: call it once the block is committed and in
        the tier, so a client that reads it there finds the block with a get."""
        fp = fingerprint(key)
        idx = self._index
        with self._lock:
            for start in self._ways(fp):
                for i in range(start, start + INDEX_WAYS):
                    if idx[i] == 0:
                        idx[i] = fp
                        return
            self._unindexed.add(key)
            self._publish_flags()

    def unindex_key(self, key: bytes) -> None:
        """Withdraw ``key`` from the presence index: call it before the block leaves the tier."""
        fp = fingerprint(key)
        idx = self._index
        with self._lock:
            if key in self._unindexed:
                self._unindexed.discard(key)
                self._publish_flags()
                return
            for start in self._ways(fp):
                for i in range(start, start + INDEX_WAYS):
                    if idx[i] == fp:
                        idx[i] = 0
                        return

    def set_final_misses(self, final: bool) -> None:
        """Say whether a key missing from the index is missing from the worker (no lower tier)."""
        with self._lock:
            self._final_misses = final
            self._publish_flags()

    def _publish_flags(self) -> None:
        final = self._final_misses and not self._unindexed
        self._set_word(INDEX_FLAGS_AT, INDEX_FINAL_MISSES if final else 0)

    # ------------------------------------------------------------------------------- pins
    def pin(self, indexes: Iterable[int], timeout: float | None = None) -> int:
        """Keep these slots' bytes from reuse until unpin() or the timeout; return a pin id."""
        held = list(indexes)
        expires = time.monotonic() + (self.lease_timeout if timeout is None else timeout)
        with self._lock:
            pid = next(self._pin_ids)
            held = [i for i in held if i in self._slots]
            for i in held:
                self._slots[i].pins += 1
            self._pins[pid] = (held, expires)
            heapq.heappush(self._expiry, (expires, pid))
        return pid

    def unpin(self, pin_id: int) -> None:
        with self._lock:
            entry = self._pins.pop(pin_id, None)
            if entry is None:
                return
            for i in entry[0]:
                s = self._slots.get(i)
                if s is None:
                    continue
                s.pins -= 1
                if s.zombie and s.pins == 0:
                    self.zombies -= 1
                    self._reclaim(i, s)

    def expire_pins(self, now: float | None = None) -> int:
        """Drop pins past their timeout; return how many expired."""
        now = time.monotonic() if now is None else now
        expired = []
        with self._lock:
            while self._expiry and self._expiry[0][0] <= now:
                _, pid = heapq.heappop(self._expiry)
                if pid in self._pins:
                    expired.append(pid)
        for pid in expired:
            self.unpin(pid)
        return len(expired)

    @property
    def pinned(self) -> int:
        return len(self._pins)

    def close(self) -> None:
        """Unlink the file and unmap (clients keep their own mappings). Idempotent."""
        if self._closed:
            return
        self._closed = True
        # Clients keep their mappings after the unlink: tell them the index is no longer kept.
        self._set_word(INDEX_STATE_AT, INDEX_RETIRED)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        with contextlib.suppress(BufferError):
            self._index.release()
            self.view.release()
            self._map.close()


@dataclass(frozen=True, slots=True)
class Stage:
    """A client's staging area as the worker holds it: an open descriptor, and for a sealed
    memfd a read-only mapping (it can never shrink, so reading it never faults)."""

    fd: int
    mapped: memoryview | None = None


@dataclass(frozen=True, slots=True)
class FileRange:
    """``nbytes`` of a client's staging area at ``offset``: a put's source on the same host.

    A staging file is read with pread, never mapped: a client that truncates its file makes the
    read come up short (the block is rejected), where a mapping would kill the worker with
    SIGBUS. A sealed memfd cannot shrink, so it is mapped and copied with memcpy.
    """

    stage: Stage
    offset: int
    nbytes: int
    # A client's own buffer (a put without checksums): its bytes count only if the last of
    # them was read before this deadline (CLOCK_MONOTONIC, ns), while the client still waited.
    until_ns: int | None = None
    # Copy threads a large block may be copied on (None: the calling thread only).
    pool: ThreadPoolExecutor | None = None
    # Where the block starts in this process, for a mapped memfd whose address the caller holds
    # (piece_copy.held_address) while the copy lasts: memcpy with the GIL released.
    base: int | None = None

    def check_deadline(self) -> None:
        """Raise OSError once the put's deadline has passed (never, for a checksummed put)."""
        if self.until_ns is not None and time.monotonic_ns() >= self.until_ns:
            raise OSError("the put's deadline passed before its bytes were read")

    def begin(self) -> None:
        """Refuse a copy that would start after the deadline, or read past a mapped memfd."""
        self.check_deadline()
        mapped = self.stage.mapped
        if mapped is not None and self.offset + self.nbytes > mapped.nbytes:
            raise OSError(f"staging memfd ends before {self.offset + self.nbytes} bytes")

    def copy(self, local: int, at: int, n: int) -> None:
        """Copy ``n`` bytes at ``at`` to address ``local`` (a PieceSource), GIL released."""
        if self.base is not None:
            ctypes.memmove(local, self.base + at, n)
        else:
            self.read_into(memoryview((ctypes.c_char * n).from_address(local)).cast("B"), at)

    def vouch(self) -> None:
        """After the last piece: every piece was read before the deadline, or none counts."""
        self.check_deadline()

    def read_into(self, dst: memoryview, at: int) -> None:
        """Fill ``dst`` from the stage at ``offset + at``; raise OSError on a short read."""
        want = dst.nbytes
        start = self.offset + at
        mapped = self.stage.mapped
        if mapped is not None:
            if start + want > mapped.nbytes:
                raise OSError(f"staging memfd ends before {start + want} bytes")
            dst[:] = mapped[start : start + want]
            return
        got = os.preadv(self.stage.fd, [dst], start)
        while 0 < got < want:  # tmpfs returns everything at once; a regular file may not
            more = os.preadv(self.stage.fd, [dst[got:]], start + got)
            if more <= 0:
                break
            got += more
        if got != want:
            raise OSError(f"staging file ended after {got} of {want} bytes")


class StageMaps:
    """Clients' staging areas, opened read-only by the worker, most recently used kept.

    Only files named like a staging file, directly in the arena folder, are accepted, and
    memfds named like one (``memfd:<pid>:<fd>:<nonce>``) whose ``/proc`` link names that very
    memfd and which are sealed against shrinking: a put cannot make the worker read anything
    else, nor map a file that could shrink under it.
    """

    MAX_OPEN = 64

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._open: OrderedDict[str, tuple[Stage, mmap.mmap | None]] = OrderedDict()

    def get(self, path: str) -> Stage:
        """Return the open staging area ``path`` (a file path, or a memfd's name)."""
        held = self._open.get(path)
        if held is not None:
            self._open.move_to_end(path)
            return held[0]
        memfd = parse_memfd_stage(path)
        if memfd is not None:
            stage, mapping = _open_memfd(*memfd)
        else:
            name = os.path.basename(path)
            if os.path.dirname(path) != self.directory or not name.startswith(STAGE_PREFIX):
                raise ValueError(f"'stage' must be a staging file in {self.directory}")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise ValueError(f"cannot open staging file: {exc.strerror}") from None
            stage, mapping = Stage(fd), None
        self.forget_released()
        self._open[path] = (stage, mapping)
        while len(self._open) > self.MAX_OPEN:
            _, old = self._open.popitem(last=False)
            _close_stage(*old)
        return stage

    def forget_released(self) -> None:
        # Our descriptor (and mapping) keeps a staging area's pages alive after its client
        # closes it or exits: let go of those when another one shows up, and when idle. A
        # Client.buffer that a live process dropped would otherwise stay in this worker's
        # memory, outside every budget, until that process exits.
        for path in list(self._open):
            if not _client_holds(path):
                _close_stage(*self._open.pop(path))

    def close(self) -> None:
        while self._open:
            _, held = self._open.popitem()
            _close_stage(*held)


def _client_holds(path: str) -> bool:
    """Whether a staging area's client still has it: a memfd still open in that process (its
    /proc link still names it: a closed or reused descriptor does not), a file's client alive."""
    memfd = parse_memfd_stage(path)  # (a name accepted when it was opened: well formed)
    if memfd is not None:
        proc_path, target = memfd
        try:
            return os.readlink(proc_path) == target
        except OSError:  # the process or its descriptor is gone
            return False
    pid = _stage_pid(path)
    return pid is None or pid_alive(pid)


def _stage_pid(path: str) -> int | None:
    """The client pid a staging area's name carries (memfd:<pid>:..., lmcached-stage-<pid>-...)."""
    if path.startswith(MEMFD_STAGE_PREFIX):
        text = path[len(MEMFD_STAGE_PREFIX) :].split(":", 1)[0]
    else:
        text = os.path.basename(path)[len(STAGE_PREFIX) :].split("-", 1)[0]
    return int(text) if text.isdigit() else None


def _open_memfd(proc_path: str, target: str) -> tuple[Stage, mmap.mmap]:
    """Open and map a client's staging memfd; ValueError unless it is one, sealed."""
    # The link names what the descriptor refers to: a put naming another kind of file (or a
    # reused pid, or another client's descriptor number) finds another name and is refused
    # before we open anything, so opening has no side effect (a FIFO without a writer would
    # block the worker's loop). Checked again on our own descriptor: the client may have
    # swapped it in between.
    try:
        link = os.readlink(proc_path)
    except OSError as exc:
        raise ValueError(f"cannot open staging memfd: {exc.strerror}") from None
    if link != target:
        raise ValueError("'stage' does not name a staging memfd")
    try:
        fd = os.open(proc_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ValueError(f"cannot open staging memfd: {exc.strerror}") from None
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != target:
            raise ValueError("'stage' does not name a staging memfd")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            raise ValueError("'stage' is not a sealable memfd") from None
        if not seals & fcntl.F_SEAL_SHRINK:
            raise ValueError("a staging memfd must be sealed against shrinking")
        size = os.fstat(fd).st_size
        if size <= 0:
            raise ValueError("staging memfd is empty")
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except BaseException:
        os.close(fd)
        raise
    return Stage(fd, memoryview(mapping)), mapping


def _close_stage(stage: Stage, mapping: mmap.mmap | None) -> None:
    if stage.mapped is not None:
        with contextlib.suppress(BufferError):
            stage.mapped.release()
    if mapping is not None:
        with contextlib.suppress(BufferError):
            mapping.close()
    with contextlib.suppress(OSError):
        os.close(stage.fd)


def remove_stale(directory: str, tag: str, worker_id: int) -> None:
    """Unlink arenas of earlier starts of this worker and stage files of dead clients."""
    mine = f"{ARENA_PREFIX}{tag}-w{worker_id}-"
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(mine):
                # A predecessor killed before the scheduler could retire its index.
                retire_arena(os.path.join(directory, name))
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))
            elif name.startswith(STAGE_PREFIX):
                pid = name[len(STAGE_PREFIX) :].split("-", 1)[0]
                if pid.isdigit() and not pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(directory, name))
