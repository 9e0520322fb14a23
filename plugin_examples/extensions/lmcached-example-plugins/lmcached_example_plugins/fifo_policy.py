"""A FIFO eviction policy: one row in a manifest adds it to every tier's choices."""

from __future__ import annotations

from collections import OrderedDict

from lmcached.storage.eviction import EvictionPolicy


class FIFOPolicy(EvictionPolicy):
    """Evict the oldest inserted key; hits do not matter."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def on_insert(self, key: bytes, nbytes: int) -> None:
        self._order.pop(key, None)
        self._order[key] = None

    def on_access(self, key: bytes) -> None:
        return None  # FIFO ignores hits by definition

    def on_remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self) -> bytes | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)
