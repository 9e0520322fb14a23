"""The TieredStore: one per worker, owning the policy across tiers.

Lookup order is the order of ``tiers`` (CPU first). A hit in a lower tier is promoted into the
first tier. Puts land in the first tier synchronously; lower tiers are written by the store's
write path (see the tiers issue for asynchronous write-through).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmcached.storage.base import Block, StorageBackend


class TieredStore:
    """Route gets, puts and deletes across an ordered list of tiers."""

    def __init__(self, tiers: Sequence[StorageBackend]) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        self.tiers = list(tiers)
        self._closed = False

    @property
    def top(self) -> StorageBackend:
        return self.tiers[0]

    def contains(self, key: bytes) -> bool:
        return any(t.contains(key) for t in self.tiers)

    def get(self, key: bytes) -> Block | None:
        for i, tier in enumerate(self.tiers):
            block = tier.get(key)
            if block is not None:
                if i > 0:
                    self.top.put(key, block)
                return block
        return None

    def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        return [self.get(k) for k in keys]

    def put(self, key: bytes, block: Block) -> bool:
        return self.top.put(key, block)

    def remove(self, key: bytes) -> bool:
        removed = False
        for tier in self.tiers:
            removed = tier.remove(key) or removed
        return removed

    def remove_prefix(self, prefix: bytes) -> int:
        # Count distinct keys, not tier entries: a key in CPU and on disk is one key.
        victims: set[bytes] = set()
        for tier in self.tiers:
            victims.update(k for k in tier.iter_keys() if k.startswith(prefix))
        for key in victims:
            self.remove(key)
        return len(victims)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for pending lower-tier writes; True when none remain. The CPU tier has none."""
        return True

    def stats(self) -> dict[str, Any]:
        return {t.name: t.stats() for t in self.tiers}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for tier in self.tiers:
            tier.close()
