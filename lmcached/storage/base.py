"""The one interface every storage tier implements.

A backend knows where bytes live and nothing else: no promotion, no cross-tier policy (that is
the TieredStore's job). Blocks are handed around as :class:`Block`, whose payload may be split
into several buffers exactly as it travelled on the wire, so the CPU tier can keep the received
ZMQ frames without copying them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

# Anything exposing the buffer protocol: bytes, bytearray, memoryview, zmq.Frame's buffer.
Buffer = Any


@dataclass(slots=True)
class Block:
    """One KV block: its payload buffers (in order) plus the client's metadata.

    ``checksum`` is the payload's xxh3-64 (see docs/format.md): set by the client in the put
    header, or by a tier that read and verified the block; computed lazily when absent.
    """

    frames: tuple[Buffer, ...]
    nbytes: int
    meta: dict[str, Any] | None = None
    # xxh3-64 of the payload, computed once where the block enters (the client's put header).
    checksum: int | None = None
    # The arena descriptor holding the payload, when the CPU tier keeps it in shared memory.
    slot: int | None = None

    @classmethod
    def from_bytes(
        cls, data: Buffer, meta: dict[str, Any] | None = None, checksum: int | None = None
    ) -> Block:
        mv = memoryview(data).cast("B")
        return cls(frames=(mv,), nbytes=mv.nbytes, meta=meta, checksum=checksum)

    def in_frames_of(self, limit: int) -> tuple[Buffer, ...]:
        """The payload as frames of at most ``limit`` bytes: views of the frames, no copy.

        What goes on the wire: a 32 MiB frame would make the receiving libzmq allocate 32 MiB
        at once, above glibc's mmap threshold, fresh pages for every reply.
        """
        if all(memoryview(f).nbytes <= limit for f in self.frames):
            return self.frames
        out: list[Buffer] = []
        for f in self.frames:
            mv = memoryview(f).cast("B")
            out.extend(mv[i : i + limit] for i in range(0, mv.nbytes, limit))
        return tuple(out)

    def tobytes(self) -> bytes:
        """Return the payload as one bytes object (a copy; for tiers that serialise)."""
        if len(self.frames) == 1:
            return bytes(self.frames[0])
        return b"".join(memoryview(f) for f in self.frames)


@dataclass(slots=True)
class Usage:
    """How full a tier is."""

    used_bytes: int
    capacity_bytes: int
    entries: int


@dataclass
class TierStats:
    """Counters every tier keeps; the TieredStore and `status` report them."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    bytes_stored: int = 0
    bytes_read: int = 0
    evictions: int = 0
    rejected: int = 0
    errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        out = {
            "hits": self.hits,
            "misses": self.misses,
            "puts": self.puts,
            "bytes_stored": self.bytes_stored,
            "bytes_read": self.bytes_read,
            "evictions": self.evictions,
            "rejected": self.rejected,
            "errors": self.errors,
        }
        out.update(self.extra)
        return out


class StorageBackend(ABC):
    """Store, fetch and forget blocks by key. Implementations handle bytes only."""

    name: str = "backend"

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """Return True when the key is stored (no recency update)."""

    @abstractmethod
    def get(self, key: bytes) -> Block | None:
        """Return the block, or None on a miss. Never return bytes that fail verification."""

    @abstractmethod
    def put(self, key: bytes, block: Block) -> bool:
        """Store the block; return False when the tier rejected it (too large, full, failed)."""

    @abstractmethod
    def remove(self, key: bytes) -> bool:
        """Forget the key; return True when it was present."""

    @abstractmethod
    def iter_keys(self) -> Iterator[bytes]:
        """Iterate over the stored keys (a snapshot; safe to remove while iterating)."""

    @abstractmethod
    def usage(self) -> Usage:
        """Return bytes used, capacity and entry count."""

    @abstractmethod
    def close(self) -> None:
        """Release resources. Idempotent."""

    def stats(self) -> dict[str, Any]:
        """Return counters for status and metrics."""
        return {}

    def usage_stats(self, counters: TierStats) -> dict[str, int]:
        """Return ``counters`` plus how full the tier is: the common part of every tier's stats."""
        u = self.usage()
        return {
            **counters.as_dict(),
            "used_bytes": u.used_bytes,
            "capacity_bytes": u.capacity_bytes,
            "entries": u.entries,
        }

    # Batched variants; tiers that gain from batching (Redis pipelines) override them.
    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [self.contains(k) for k in keys]

    def contained_prefix(self, keys: Sequence[bytes]) -> int:
        """Return how many leading ``keys`` are stored (no recency update)."""
        for i, key in enumerate(keys):
            if not self.contains(key):
                return i
        return len(keys)

    def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, Block]]) -> list[bool]:
        return [self.put(k, b) for k, b in items]

    def remove_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Forget each key; return, per key, whether it was present."""
        return [self.remove(k) for k in keys]

    def keys_with_prefix(self, prefix: bytes) -> list[bytes]:
        """Return the stored keys that start with ``prefix`` (a remote may scan server-side)."""
        return [k for k in self.iter_keys() if k.startswith(prefix)]

    def remove_prefix(self, prefix: bytes) -> int:
        """Forget every key that starts with ``prefix``; return how many."""
        return sum(self.remove_many(self.keys_with_prefix(prefix)))
