"""The CPU-memory tier: blocks under a byte budget, their bytes in the worker's shared arena.

Budget accounting: an entry costs its slot bytes (the allocator's rounded size, or the payload
size without an arena) + its key + its encoded meta + :data:`ENTRY_OVERHEAD`. Keys and metas
live on the heap, slots in the arena, so the budget bounds both; eviction frees slots. A block
put over ZMQ keeps its received frames on the heap and holds an unbacked slot of its size, so
the arena's pages and those frames share the one budget.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import msgpack
import xxhash

from lmcached.storage import piece_copy
from lmcached.storage.arena import ENTRY_OVERHEAD, Arena, FileRange, slot_size
from lmcached.storage.base import Block, StorageBackend, TierStats, Usage
from lmcached.storage.eviction import EvictionPolicy, make_policy
from lmcached.storage.peer_memory import PeerRange

# Bytes copied between two hash updates: small enough to be hashed while still in cache.
HASH_PIECE = 1 << 20


def meta_bytes(meta: dict[str, Any] | None) -> int:
    """Encoded size of a meta, as the budget counts it."""
    return 0 if meta is None else len(msgpack.packb(meta, use_bin_type=True))


def entry_cost(key: bytes, nbytes: int, meta: dict[str, Any] | None, arena: bool) -> int:
    """What one entry costs against the CPU budget."""
    payload = slot_size(nbytes) if arena else nbytes
    return payload + len(key) + meta_bytes(meta) + ENTRY_OVERHEAD


def copy_pieces(dst: memoryview, frames: tuple[Any, ...], h: Any) -> Generator[None, None, None]:
    """Copy ``frames`` into ``dst`` piece by piece, hashing each piece as written into ``h``.

    Yields after each piece, so that a caller may interleave other work between pieces.
    """
    off = 0
    for frame in frames:
        if isinstance(frame, (PeerRange, FileRange)):
            # A same-host source: copied by address, GIL released, maybe on the copy threads.
            yield from piece_copy.copy_hashing(frame, dst[off : off + frame.nbytes], h, frame.pool)
            off += frame.nbytes
            continue
        src = memoryview(frame).cast("B")
        n = src.nbytes
        for i in range(0, n, HASH_PIECE):
            piece = src[i : i + HASH_PIECE]
            end = off + piece.nbytes
            dst[off:end] = piece
            h.update(dst[off:end])  # the bytes we will serve, not the sender's
            off = end
            yield


def hash_pieces(frames: tuple[Any, ...], h: Any) -> Generator[None, None, None]:
    """Hash ``frames`` into ``h`` piece by piece, yielding after each piece (no copy)."""
    for frame in frames:
        src = memoryview(frame).cast("B")
        for i in range(0, src.nbytes, HASH_PIECE):
            h.update(src[i : i + HASH_PIECE])
            yield


def copy_hashing(dst: memoryview, frames: tuple[Any, ...]) -> int:
    """Copy ``frames`` into ``dst`` piece by piece, hashing each piece as written; return xxh3."""
    h = xxhash.xxh3_64()
    for _ in copy_pieces(dst, frames, h):
        pass
    return h.intdigest()


class ArenaWrite:
    """A put whose block is being copied into its reserved arena slot, one piece per step().

    Made by :meth:`CPUBackend.start_put`. The slot is allocated and its cost counted, but
    nothing publishes it until :meth:`finish`, so step() needs no lock: no reader, eviction or
    promotion can reach it. finish() and abort() change the tier, so they run under the lock
    that guards the tier (the TieredStore's CPU lock). Without ``dst`` the block keeps its own
    buffers, and the steps only hash them, to check the sender's checksum.
    """

    __slots__ = (
        "_hash",
        "_pieces",
        "block",
        "cancelled",
        "cost",
        "failed",
        "in_place",
        "index",
        "key",
        "tier",
    )

    def __init__(
        self,
        tier: CPUBackend,
        key: bytes,
        block: Block,
        cost: int,
        index: int,
        dst: memoryview | None,
    ) -> None:
        self.tier = tier
        self.key = key
        self.block = block
        self.cost = cost
        self.index: int | None = index
        self.failed = False
        self.cancelled = False
        self.in_place = dst is None
        self._hash = xxhash.xxh3_64()
        self._pieces = (
            hash_pieces(block.frames, self._hash)
            if dst is None
            else copy_pieces(dst, block.frames, self._hash)
        )

    def step(self) -> bool:
        """Copy the next piece; False once every piece is copied (or the source failed)."""
        try:
            next(self._pieces)
        except StopIteration:
            return False
        except OSError:  # a staging file cut short under us
            self.failed = True
            return False
        return True

    def copy_all(self) -> None:
        """Copy every piece, on whatever thread calls it (a copy thread of a put's batch).

        Nothing else may step this write meanwhile; :attr:`cancelled` stops it between
        pieces, and the write then fails.
        """
        while not self.cancelled and self.step():
            pass
        if self.cancelled:
            self.failed = True
            self._pieces.close()  # ends its exports of the slot and of the source now

    def finish(self) -> bool:
        """Copy what is left, verify, and publish the block; False when it is rejected."""
        while self.step():
            pass
        return self.tier._finish_put(self)

    def abort(self) -> None:
        """Give the slot and the reserved budget back (idempotent).

        Not while another thread steps this write: its copy would go on into a freed slot.
        """
        self._pieces.close()  # ends its exports of the slot and of the source now
        self.tier._release_write(self)


class CPUBackend(StorageBackend):
    """Hold blocks under a byte budget; evict by policy when it is exceeded.

    With an arena the payload is copied into a slot at put (hashed while copying: a block whose
    checksum does not match what was copied is rejected), and the stored Block is a view of that
    slot, except for a put with ``keep_buffers`` (a ZMQ put: see :meth:`start_put`). Without an
    arena every Block is kept as received (its ZMQ frames, no copy).
    """

    name = "cpu"

    def __init__(
        self,
        capacity_bytes: int,
        policy: str | EvictionPolicy = "lru",
        arena: Arena | None = None,
    ) -> None:
        self.capacity = capacity_bytes
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.arena = arena
        self._blocks: dict[bytes, Block] = {}
        self._costs: dict[bytes, int] = {}
        self._used = 0
        # Entries kept in their own buffers: the arena slot each holds unbacked.
        self._unbacked: dict[bytes, int] = {}
        self.counters = TierStats()
        self._closed = False
        # Called with (key, block) after an eviction; the TieredStore's write-back policy uses it.
        self.on_evict: Callable[[bytes, Block], None] | None = None

    def contains(self, key: bytes) -> bool:
        return key in self._blocks

    def contained_prefix(self, keys: Sequence[bytes]) -> int:
        # A lookup asks about a prompt's 100s of keys on the worker's loop: count the leading
        # hits at C level (map, compress), not with a Python call per key.
        misses = itertools.compress(
            itertools.count(), map(operator.not_, map(self._blocks.__contains__, keys))
        )
        return next(misses, len(keys))

    def get(self, key: bytes) -> Block | None:
        block = self._blocks.get(key)
        if block is None:
            self.counters.misses += 1
            return None
        self.policy.on_access(key)
        self.counters.hits += 1
        self.counters.bytes_read += block.nbytes
        return block

    def put(self, key: bytes, block: Block) -> bool:
        started = self.start_put(key, block)
        if isinstance(started, bool):
            return started
        return started.finish()

    def start_put(
        self, key: bytes, block: Block, keep_buffers: bool = False, defer: bool = False
    ) -> ArenaWrite | bool:
        """Begin a put: True or False when it is already done or refused (a block of one piece
        is done at once), or an ArenaWrite whose bytes the caller copies (ArenaWrite.step)
        before it finishes or aborts it.

        The key's earlier block goes at once, as a whole put would drop it, and the new
        entry's cost is reserved, so that what happens between the steps (gets, promotions
        on the I/O threads) sees a consistent budget.

        ``keep_buffers``: store the block's own buffers (the ZMQ frames a remote put arrived
        in) instead of copying them into the arena. The entry still takes an arena slot, left
        unbacked, so both kinds of entry share one allocator and one budget. Same-host
        clients then get its bytes over ZMQ, not from shared memory. A block that comes with
        a checksum is hashed in steps first, and refused if the checksum does not match.

        ``defer``: return an ArenaWrite even for a block of one piece (a batch copies it on a
        copy thread).
        """
        cost = entry_cost(key, block.nbytes, block.meta, self.arena is not None)
        if cost > self.capacity:
            self.counters.rejected += 1
            return False
        self.remove(key)
        self._make_room(cost)
        if self.arena is None:
            self._insert(key, block, cost)
            return True
        index = self.arena.alloc(block.nbytes, unbacked=keep_buffers)
        while index is None and self._evict_one():
            # fragmentation or pinned zombies
            index = self.arena.alloc(block.nbytes, unbacked=keep_buffers)
        if index is None:
            self.counters.rejected += 1
            return False
        if keep_buffers and block.checksum is None:
            self._insert(key, block, cost)
            self._unbacked[key] = index
            return True
        self._used += cost
        dst = None if keep_buffers else self.arena.payload(index)
        write = ArenaWrite(self, key, block, cost, index, dst)
        if block.nbytes <= HASH_PIECE and not defer:
            try:
                return write.finish()  # one piece: nothing to interleave, and one lock less
            except BaseException:  # the source refused to be read (a direct put): no leak
                write.abort()
                raise
        return write

    def _finish_put(self, w: ArenaWrite) -> bool:
        assert self.arena is not None and w.index is not None
        checksum = w._hash.intdigest()
        if w.failed or (w.block.checksum is not None and checksum != w.block.checksum):
            # A short staging file, bytes changed under us (a neighbour writing the sender's
            # staging), or a bad sender.
            self._release_write(w)
            self.counters.errors += 1
            if not w.failed:
                self.counters.extra["checksum_rejected"] = (
                    self.counters.extra.get("checksum_rejected", 0) + 1
                )
            return False
        index, w.index = w.index, None
        # A promotion may have put an older copy here while we copied: ours is newer.
        self.remove(w.key)
        self._used -= w.cost  # _insert counts it again
        if w.in_place:
            self._insert(w.key, w.block, w.cost)
            self._unbacked[w.key] = index
            return True
        self.arena.commit(index, checksum)
        block = Block(
            frames=(self.arena.payload(index),),
            nbytes=w.block.nbytes,
            meta=w.block.meta,
            checksum=checksum,
            slot=index,
        )
        self._insert(w.key, block, w.cost)
        return True

    def _release_write(self, w: ArenaWrite) -> None:
        if w.index is None or self.arena is None:
            return
        index, w.index = w.index, None
        self.arena.release(index)
        self._used -= w.cost

    def _insert(self, key: bytes, block: Block, cost: int) -> None:
        self._blocks[key] = block
        if self.arena is not None:
            self.arena.index_key(key)  # after the block is in: a client that sees it can get it
        self._costs[key] = cost
        self._used += cost
        self.policy.on_insert(key, block.nbytes)
        self.counters.puts += 1
        self.counters.bytes_stored += block.nbytes

    def _make_room(self, cost: int) -> None:
        while self._used + cost > self.capacity and self._evict_one():
            pass

    def _evict_one(self) -> bool:
        victim = self.policy.victim()
        if victim is None:
            return False
        block = self._blocks.get(victim)
        if self.on_evict is not None and block is not None and block.slot is not None:
            # The slot is about to be reused: a lower tier gets its own copy of the bytes.
            block = Block.from_bytes(block.tobytes(), block.meta, block.checksum)
        self.remove(victim)
        self.counters.evictions += 1
        if self.on_evict is not None and block is not None:
            self.on_evict(victim, block)
        return True

    def remove(self, key: bytes) -> bool:
        if key not in self._blocks:
            return False
        if self.arena is not None:
            self.arena.unindex_key(key)  # before the block goes, so no client counts it after
        block = self._blocks.pop(key)
        self._used -= self._costs.pop(key)
        self.policy.on_remove(key)
        if self.arena is not None:
            index = block.slot if block.slot is not None else self._unbacked.pop(key, None)
            if index is not None:
                self.arena.release(index)
        return True

    def settle(self, keys: Sequence[bytes]) -> int:
        """Move the blocks of ``keys`` kept in their own buffers (ZMQ puts) into their slots.

        For a same-host reader: a block in a slot is read from shared memory, the others go
        over ZMQ. Each block is copied (and hashed) once, into the slot its entry reserved at
        put, so neither the budget nor the allocator changes. A block whose bytes no longer
        match the checksum it was put with is dropped (counted in ``errors``): serving it over
        ZMQ instead would serve wrong bytes, and copying it again on every read would cost a
        copy each time. Returns how many moved.
        """
        if self.arena is None or not self._unbacked:
            return 0
        moved = 0
        for key in keys:
            index = self._unbacked.get(key)
            if index is None:
                continue
            block = self._blocks[key]
            self.arena.back(index)
            payload = self.arena.payload(index)
            checksum = copy_hashing(payload, block.frames)
            if block.checksum is not None and checksum != block.checksum:
                self.remove(key)
                self.counters.errors += 1
                continue
            self.arena.commit(index, checksum)
            del self._unbacked[key]
            self._blocks[key] = Block(
                frames=(payload,),
                nbytes=block.nbytes,
                meta=block.meta,
                checksum=checksum,
                slot=index,
            )
            moved += 1
        if moved:
            self.counters.extra["settled"] = self.counters.extra.get("settled", 0) + moved
        return moved

    def iter_keys(self) -> Iterator[bytes]:
        return iter(list(self._blocks))

    def usage(self) -> Usage:
        return Usage(used_bytes=self._used, capacity_bytes=self.capacity, entries=len(self._blocks))

    def stats(self) -> dict[str, int]:
        out = self.usage_stats(self.counters)
        if self.arena is not None:
            out["arena_slot_bytes"] = self.arena.slot_bytes
            out["arena_pinned"] = self.arena.pinned
            out["arena_zombies"] = self.arena.zombies
            out["entries_outside_arena"] = len(self._unbacked)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._blocks.clear()
        self._costs.clear()
        self._unbacked.clear()
        self._used = 0
        if self.arena is not None:
            self.arena.close()
