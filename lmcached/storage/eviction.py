"""Eviction policies: small strategy objects chosen by name.

A policy only orders keys; the tier owns the bytes and the budget. Adding a policy is one row in
``POLICIES``, not a subclass of a tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict


class EvictionPolicy(ABC):
    """Track keys and pick the next one to evict."""

    @abstractmethod
    def on_insert(self, key: bytes, nbytes: int) -> None:
        """Record a newly stored key."""

    @abstractmethod
    def on_access(self, key: bytes) -> None:
        """Record a hit on a stored key."""

    @abstractmethod
    def on_remove(self, key: bytes) -> None:
        """Forget a key that left the tier (deleted or evicted)."""

    @abstractmethod
    def victim(self) -> bytes | None:
        """Return the key to evict next, or None when empty. Does not remove it."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used key."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def on_insert(self, key: bytes, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self) -> bytes | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """Return a new policy instance by name; raise ValueError naming the known ones."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
