"""The arena file of one worker: header, descriptor table, payload area, and safe reads.

Layout (all integers little-endian)::

    [0, 4096)            header: magic, layout version, descriptor count and offsets, nonce;
                         the presence index's offset and bucket count; its state and flags
    [4096, index)        descriptor table: DESCRIPTOR_SIZE bytes per entry
    [index, data_offset) presence index: INDEX_BUCKET bytes per bucket (see below)
    [data_offset, size)  payload area, carved into slots by the worker's allocator

A descriptor is ``generation, offset, length, checksum`` (four u64). Descriptors live apart
from the payload, so no payload byte can ever be read as a descriptor, whatever a client puts.

Generation rules (a seqlock; see docs/same-host.md):

- The worker gives every committed block a new, even generation, never reused while the
  arena lives. It writes the payload first and the generation last.
- When a slot is freed the worker first sets the generation to an odd value; only then may
  its bytes be reused.
- A reader is told ``(index, generation, offset, length)``. It reads the descriptor's
  generation, reads the bytes, then reads the generation again: unchanged means the bytes it
  read are the committed ones. Anything else is :class:`StaleSlot`, never someone else's bytes.

x86-64 keeps stores in order and loads in order, which is what the two rules need; the worker
and the client only run on the same host.

The presence index lets a same-host client count a prompt's leading hits without a round trip.
Each key the CPU tier holds has its fingerprint (xxh3-64 of the key, 0 read as 1) in one of
two buckets of INDEX_WAYS u64 words: ``fp & mask`` or ``(fp >> 32) & mask``. The worker writes
a fingerprint after the block is committed and indexed, and zeroes it before the block leaves
the tier, so a reader that finds it races a later get exactly as a round-trip lookup would.
Fingerprints never move, so a key the worker holds is never missed while it stays. The index
is trusted only while its worker lives: the worker holds an exclusive flock on the arena file
(the kernel drops it when the process dies, ``kill -9`` included), and its state word says
LIVE (a stopping worker, and the scheduler when it reaps a dead one, write RETIRED). It answers
a miss only when its flags say misses are final (no lower tier, and every key of the tier found
a bucket with room).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

__all__ = [
    "DATA_ALIGN",
    "DESCRIPTOR_SIZE",
    "HEADER_SIZE",
    "INDEX_BUCKET",
    "INDEX_FINAL_MISSES",
    "INDEX_LIVE",
    "INDEX_RETIRED",
    "INDEX_WAYS",
    "MAGIC",
    "ArenaHeader",
    "ArenaReader",
    "SlotRef",
    "StaleSlot",
    "arena_file_name",
    "fingerprint",
    "instance_tag",
    "memfd_stage",
    "parse_memfd_stage",
    "retire_arena",
    "stage_file_name",
]

MAGIC = b"LMCARENA"
LAYOUT_VERSION = 1
HEADER_SIZE = 4096
DESCRIPTOR_SIZE = 32
# Payload area alignment (a page: friendly to cudaHostRegister and to the page cache).
DATA_ALIGN = 4096
# magic, version, descriptor count, descriptor offset, data offset, data size, nonce (16 bytes)
_HEADER = struct.Struct("<8sIxxxxQQQQ16s")
_DESCRIPTOR = struct.Struct("<QQQQ")
_GENERATION = struct.Struct("<Q")
# After the fields above (64 bytes): the presence index's offset and bucket count (0: none, as in
# arenas written before the index existed), then its state and flags words.
_INDEX = struct.Struct("<QQ")
INDEX_FIELDS_AT = 64
INDEX_STATE_AT = 128
INDEX_FLAGS_AT = 136
_WORD = struct.Struct("<Q")
INDEX_WAYS = 8
INDEX_BUCKET = INDEX_WAYS * 8  # one cache line
# State word: a reader trusts the index only while it reads LIVE.
INDEX_LIVE = 1
INDEX_RETIRED = 2
# Flags word: a key absent from the index is absent from the worker (no lower tier to ask, and
# no key of the CPU tier went unindexed for want of room).
INDEX_FINAL_MISSES = 1

ARENA_PREFIX = "lmcached-arena-"
STAGE_PREFIX = "lmcached-stage-"


class StaleSlot(Exception):
    """The slot was freed or reused since the worker described it (lease expired, evicted)."""


@dataclass(frozen=True, slots=True)
class SlotRef:
    """Where a committed block lives in an arena, as the worker described it in a get reply."""

    index: int
    generation: int
    offset: int
    length: int

    def as_list(self) -> list[int]:
        return [self.index, self.generation, self.offset, self.length]

    @classmethod
    def from_list(cls, v: object) -> SlotRef:
        if not (isinstance(v, list) and len(v) == 4 and all(type(x) is int and x >= 0 for x in v)):
            raise ValueError("a slot is [index, generation, offset, length] of non-negative ints")
        return cls(v[0], v[1], v[2], v[3])


def fingerprint(key: bytes) -> int:
    """A key's fingerprint in the presence index (never 0, which marks a free way)."""
    return xxhash.xxh3_64_intdigest(key) or 1


@dataclass(frozen=True, slots=True)
class ArenaHeader:
    descriptors: int
    descriptor_offset: int
    data_offset: int
    data_size: int
    nonce: bytes
    index_offset: int = 0
    index_buckets: int = 0

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size

    def pack(self) -> bytes:
        fields = _HEADER.pack(
            MAGIC,
            LAYOUT_VERSION,
            self.descriptors,
            self.descriptor_offset,
            self.data_offset,
            self.data_size,
            self.nonce,
        )
        index = _INDEX.pack(self.index_offset, self.index_buckets)
        return fields.ljust(INDEX_FIELDS_AT, b"\0") + index

    @classmethod
    def plan(cls, data_size: int, descriptors: int, nonce: bytes) -> ArenaHeader:
        table = descriptors * DESCRIPTOR_SIZE
        # Ways for twice the most entries the tier can hold (one descriptor each), in a power
        # of two of buckets: with two buckets to choose from, a full bucket pair is rare enough
        # that the one flag it clears (INDEX_FINAL_MISSES) costs nothing in practice.
        buckets = 1 << max(0, (-(-2 * descriptors // INDEX_WAYS) - 1).bit_length())
        index_offset = -(-(HEADER_SIZE + table) // INDEX_BUCKET) * INDEX_BUCKET
        end = index_offset + buckets * INDEX_BUCKET
        data_offset = -(-end // DATA_ALIGN) * DATA_ALIGN
        return cls(descriptors, HEADER_SIZE, data_offset, data_size, nonce, index_offset, buckets)

    @classmethod
    def unpack(cls, buf: object) -> ArenaHeader:
        magic, version, n, doff, data_off, data_size, nonce = _HEADER.unpack_from(buf)  # type: ignore[arg-type]
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise ValueError("not an lmcached arena of this layout version")
        index_off, buckets = _INDEX.unpack_from(buf, INDEX_FIELDS_AT)  # type: ignore[arg-type]
        if buckets & (buckets - 1) or index_off + buckets * INDEX_BUCKET > data_off:
            buckets = 0  # not an index this reader understands: ask the worker instead
        return cls(n, doff, data_off, data_size, nonce, index_off, buckets)

    def descriptor_at(self, index: int) -> int:
        return self.descriptor_offset + index * DESCRIPTOR_SIZE


def pack_descriptor(generation: int, offset: int, length: int, checksum: int) -> bytes:
    return _DESCRIPTOR.pack(generation, offset, length, checksum)


def pack_generation(generation: int) -> bytes:
    return _GENERATION.pack(generation)


def instance_tag(instance_dir: str) -> str:
    """A short stable tag of a daemon instance, so its arena files can be found again."""
    return hashlib.blake2b(instance_dir.encode(), digest_size=4).hexdigest()


def arena_file_name(tag: str, worker_id: int, nonce_hex: str) -> str:
    """``lmcached-arena-<instance tag>-w<id>-<nonce>``: one per worker start."""
    return f"{ARENA_PREFIX}{tag}-w{worker_id}-{nonce_hex}"


def stage_file_name(pid: int, nonce_hex: str) -> str:
    """``lmcached-stage-<client pid>-<nonce>``: a client's writable staging area."""
    return f"{STAGE_PREFIX}{pid}-{nonce_hex}"


def retire_arena(path: str) -> None:
    """Mark the presence index of a dead worker's arena RETIRED, so clients stop trusting it.

    Clients keep their mappings of an unlinked arena, so its index would go on claiming the
    blocks of a worker that no longer serves them. Best effort: a file that is gone, or not an
    arena, is left alone.
    """
    if not os.path.basename(path).startswith(ARENA_PREFIX):
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) == _HEADER.size and head.startswith(MAGIC):
                os.pwrite(fd, _WORD.pack(INDEX_RETIRED), INDEX_STATE_AT)
        finally:
            os.close(fd)


# A staging memfd, named in a put as ``memfd:<client pid>:<fd>:<nonce>``; the worker opens it
# through /proc/<pid>/fd/<fd> and accepts it only if the link names this very memfd.
MEMFD_STAGE_PREFIX = "memfd:"


def memfd_stage(pid: int, fd: int, nonce_hex: str) -> str:
    """How a put names a client's staging memfd (see :func:`parse_memfd_stage`)."""
    return f"{MEMFD_STAGE_PREFIX}{pid}:{fd}:{nonce_hex}"


def parse_memfd_stage(stage: str) -> tuple[str, str] | None:
    """Return (``/proc`` path to open, the link target it must have), or None if not a memfd.

    Raises ValueError for a memfd name that is malformed.
    """
    if not stage.startswith(MEMFD_STAGE_PREFIX):
        return None
    parts = stage[len(MEMFD_STAGE_PREFIX) :].split(":")
    if len(parts) != 3 or not all(p.isascii() and p.isalnum() for p in parts):
        raise ValueError("a staging memfd is named memfd:<pid>:<fd>:<nonce>")
    pid, fd, nonce = parts
    if not (pid.isdigit() and fd.isdigit()):
        raise ValueError("a staging memfd is named memfd:<pid>:<fd>:<nonce>")
    # memfd_create names show as "/memfd:<name> (deleted)" in /proc/<pid>/fd.
    return f"/proc/{pid}/fd/{fd}", f"/memfd:{stage_file_name(int(pid), nonce)} (deleted)"


class ArenaReader:
    """A read-only mapping of a worker's arena, as a client holds it.

    The file may be unlinked by a worker that stopped or was killed: the mapping stays valid
    (tmpfs keeps the pages while mapped) and the arena is never truncated, so reads never fault.
    """

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except BaseException:
            os.close(fd)
            raise
        try:
            self.header = ArenaHeader.unpack(self.map)
            if self.header.file_size > size:
                raise ValueError(f"arena {path} is shorter than its header says")
        except BaseException:
            self.map.close()
            os.close(fd)
            raise
        # Kept open to ask whether the worker still holds its lock on the file (it is alive).
        self._fd = fd
        self.path = path
        self.view = memoryview(self.map)
        self.size = size
        self._index: Any = None  # the presence index as a (buckets, ways) uint64 array

    def generation(self, index: int) -> int:
        if not 0 <= index < self.header.descriptors:
            raise StaleSlot(f"descriptor {index} is outside the arena")
        gen: int = _GENERATION.unpack_from(self.map, self.header.descriptor_at(index))[0]
        return gen

    def check(self, ref: SlotRef) -> None:
        """Raise StaleSlot unless the slot still holds the block ``ref`` describes."""
        if self.generation(ref.index) != ref.generation:
            raise StaleSlot(
                f"block at descriptor {ref.index} was evicted or its lease expired "
                f"(generation {ref.generation} is gone)"
            )

    def payload(self, ref: SlotRef) -> memoryview:
        """Return a read-only view of the slot's bytes (check() before and after using them)."""
        start = self.header.data_offset + ref.offset
        end = start + ref.length
        if ref.offset + ref.length > self.header.data_size:
            raise StaleSlot("slot lies outside the arena")
        return self.view[start:end]

    def copy_into(self, ref: SlotRef, dst: memoryview) -> None:
        """Copy the block into ``dst`` (one copy), then verify the generation (seqlock)."""
        self.check(ref)
        dst[: ref.length] = self.payload(ref)
        self.check(ref)

    def leading_present(self, keys: Sequence[bytes]) -> int | None:
        """Count the leading ``keys`` the presence index holds; None when it cannot tell.

        It cannot tell when the arena has no index, when its worker is gone (stopped or
        killed), or when a key is missing and misses are not final there (a lower tier may
        hold it): the worker has to be asked then.
        """
        found = self._lookup(keys)
        if found is None:
            return None
        present, final = found
        first_miss = int(present.argmin())
        if present[first_miss]:
            return len(keys)
        return first_miss if final else None

    def present(self, keys: Sequence[bytes]) -> list[bool] | None:
        """Whether the presence index holds each key; None when it cannot tell (as above)."""
        found = self._lookup(keys)
        if found is None:
            return None
        present, final = found
        if not final and not present.all():
            return None
        flags: list[bool] = present.tolist()
        return flags

    def _lookup(self, keys: Sequence[bytes]) -> tuple[Any, bool] | None:
        """Return (a bool array: key in the index, whether misses are final), or None."""
        buckets = self.header.index_buckets
        if not keys or not buckets:
            return None
        if not self.live():
            return None
        final = bool(_WORD.unpack_from(self.map, INDEX_FLAGS_AT)[0] & INDEX_FINAL_MISSES)
        np = _numpy()
        if self._index is None:
            self._index = np.frombuffer(
                self.map,
                dtype=np.uint64,
                count=buckets * INDEX_WAYS,
                offset=self.header.index_offset,
            ).reshape(buckets, INDEX_WAYS)
        n = len(keys)
        # Vectorised: one C-level pass to hash, then one gather of both buckets' cache lines.
        fps = np.fromiter(map(xxhash.xxh3_64_intdigest, keys), dtype=np.uint64, count=n)
        np.maximum(fps, 1, out=fps)  # as fingerprint(): 0 marks a free way
        buckets_of = np.empty((n, 2), dtype=np.intp)
        buckets_of[:, 0] = fps & np.uint64(buckets - 1)
        buckets_of[:, 1] = (fps >> np.uint64(32)) & np.uint64(buckets - 1)
        present = (self._index[buckets_of] == fps[:, None, None]).any(axis=(1, 2))
        return present, final

    def live(self) -> bool:
        """Whether the presence index is kept: not retired, and its worker still runs."""
        if self._fd < 0:  # closed: the mapping may be gone too
            return False
        return _WORD.unpack_from(self.map, INDEX_STATE_AT)[0] == INDEX_LIVE and self.worker_alive()

    def worker_alive(self) -> bool:
        """Whether the worker that made this arena still runs (it holds the file's flock)."""
        if self._fd < 0:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)  # nobody held it: the worker is gone
        return False

    def close(self) -> None:
        """Unmap; views handed out keep the mapping alive until they are released."""
        self._index = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # views still exported: the mapping goes when they do


def _numpy() -> Any:
    import numpy  # a client dependency; imported here so the worker, which never reads, skips it

    return numpy
