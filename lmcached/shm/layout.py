"""The arena file of one worker: header, descriptor table, payload area, and safe reads.

Layout (all integers little-endian)::

    [0, 4096)            header: magic, layout version, descriptor count and offsets, nonce
    [4096, data_offset)  descriptor table: DESCRIPTOR_SIZE bytes per entry
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
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass

__all__ = [
    "DATA_ALIGN",
    "DESCRIPTOR_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "ArenaHeader",
    "ArenaReader",
    "SlotRef",
    "StaleSlot",
    "arena_file_name",
    "instance_tag",
    "memfd_stage",
    "parse_memfd_stage",
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


@dataclass(frozen=True, slots=True)
class ArenaHeader:
    descriptors: int
    descriptor_offset: int
    data_offset: int
    data_size: int
    nonce: bytes

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            LAYOUT_VERSION,
            self.descriptors,
            self.descriptor_offset,
            self.data_offset,
            self.data_size,
            self.nonce,
        )

    @classmethod
    def plan(cls, data_size: int, descriptors: int, nonce: bytes) -> ArenaHeader:
        table = descriptors * DESCRIPTOR_SIZE
        data_offset = -(-(HEADER_SIZE + table) // DATA_ALIGN) * DATA_ALIGN
        return cls(descriptors, HEADER_SIZE, data_offset, data_size, nonce)

    @classmethod
    def unpack(cls, buf: object) -> ArenaHeader:
        magic, version, n, doff, data_off, data_size, nonce = _HEADER.unpack_from(buf)  # type: ignore[arg-type]
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise ValueError("not an lmcached arena of this layout version")
        return cls(n, doff, data_off, data_size, nonce)

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
        finally:
            os.close(fd)
        self.path = path
        self.header = ArenaHeader.unpack(self.map)
        if self.header.file_size > size:
            self.map.close()
            raise ValueError(f"arena {path} is shorter than its header says")
        self.view = memoryview(self.map)
        self.size = size

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

    def close(self) -> None:
        """Unmap; views handed out keep the mapping alive until they are released."""
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # views still exported: the mapping goes when they do
