"""The CPU-memory tier: blocks kept as the buffers they arrived in, under a byte budget."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from lmcached.storage.base import Block, StorageBackend, TierStats, Usage
from lmcached.storage.eviction import EvictionPolicy, make_policy


class CPUBackend(StorageBackend):
    """Hold blocks in process memory; evict by policy when the byte budget is exceeded.

    The stored value is the Block as received: its frames are the ZMQ frames libzmq allocated,
    so storing costs no copy and replying sends the same frames back (libzmq refcounts them).
    """

    name = "cpu"

    def __init__(self, capacity_bytes: int, policy: str | EvictionPolicy = "lru") -> None:
        self.capacity = capacity_bytes
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._blocks: dict[bytes, Block] = {}
        self._used = 0
        self.counters = TierStats()
        self._closed = False
        # Called with (key, block) after an eviction; the TieredStore's write-back policy uses it.
        self.on_evict: Callable[[bytes, Block], None] | None = None

    def contains(self, key: bytes) -> bool:
        return key in self._blocks

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
        if block.nbytes > self.capacity:
            self.counters.rejected += 1
            return False
        old = self._blocks.pop(key, None)
        if old is not None:
            self._used -= old.nbytes
            self.policy.on_remove(key)
        self._make_room(block.nbytes)
        self._blocks[key] = block
        self._used += block.nbytes
        self.policy.on_insert(key, block.nbytes)
        self.counters.puts += 1
        self.counters.bytes_stored += block.nbytes
        return True

    def _make_room(self, nbytes: int) -> None:
        while self._used + nbytes > self.capacity:
            victim = self.policy.victim()
            if victim is None:
                break
            block = self._blocks.get(victim)
            self.remove(victim)
            self.counters.evictions += 1
            if self.on_evict is not None and block is not None:
                self.on_evict(victim, block)

    def remove(self, key: bytes) -> bool:
        block = self._blocks.pop(key, None)
        if block is None:
            return False
        self._used -= block.nbytes
        self.policy.on_remove(key)
        return True

    def iter_keys(self) -> Iterator[bytes]:
        return iter(list(self._blocks))

    def usage(self) -> Usage:
        return Usage(used_bytes=self._used, capacity_bytes=self.capacity, entries=len(self._blocks))

    def stats(self) -> dict[str, int]:
        return self.usage_stats(self.counters)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._blocks.clear()
        self._used = 0
