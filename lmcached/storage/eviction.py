"""Eviction policies: small strategy objects chosen by name.

A policy only orders keys; the tier owns the bytes and the budget. Adding a policy is one row in
``POLICIES``, not a subclass of a tier.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Mapping

from lmcached.extensions.registry import PluginError, PluginNotFoundError, get_registry


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


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): scan-resistant with FIFO queues only.

    New keys enter a small probationary FIFO holding about 10 % of the tracked bytes. A key
    leaving it that was hit while there moves to the main FIFO; one that was not is evicted and
    remembered in a ghost list, so that if it comes back soon it goes straight to main. The
    main FIFO gives each hit key another round (a 2-bit counter, like CLOCK). A one-time scan
    therefore passes through the small queue and leaves without displacing the hot set, which
    is exactly where LRU fails: LRU moves every scanned key to the front.

    ``victim()`` may move keys between queues (that is not an eviction); the key it returns is
    the one the tier should remove next, and ``on_remove`` of that key completes the eviction.
    """

    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self) -> None:
        self._small: OrderedDict[bytes, int] = OrderedDict()  # key -> nbytes
        self._main: OrderedDict[bytes, int] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}
        self._small_bytes = 0
        self._main_bytes = 0
        self._victim: bytes | None = None

    def on_insert(self, key: bytes, nbytes: int) -> None:
        if key in self._freq:
            self.on_remove(key)
        self._freq[key] = 0
        if self._ghost.pop(key, False) is None:
            self._main[key] = nbytes
            self._main_bytes += nbytes
        else:
            self._small[key] = nbytes
            self._small_bytes += nbytes

    def on_access(self, key: bytes) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < self.MAX_FREQ:
            self._freq[key] = freq + 1

    def on_remove(self, key: bytes) -> None:
        if self._freq.pop(key, None) is None:
            return
        evicted = key == self._victim
        self._victim = None
        if key in self._small:
            self._small_bytes -= self._small.pop(key)
            if evicted:
                # Only an eviction from probation is remembered; a delete is not a signal.
                self._ghost[key] = None
                while len(self._ghost) > max(len(self._main), 1):
                    self._ghost.popitem(last=False)
        else:
            self._main_bytes -= self._main.pop(key)

    def victim(self) -> bytes | None:
        # Terminates: every pass either returns or lowers a counter / empties the small queue.
        while self._small or self._main:
            total = self._small_bytes + self._main_bytes
            if self._small and (self._small_bytes > self.SMALL_FRACTION * total or not self._main):
                key, nbytes = next(iter(self._small.items()))
                if self._freq[key] > 0:
                    # Hit while on probation: promote to main (not an eviction).
                    self._small.pop(key)
                    self._small_bytes -= nbytes
                    self._main[key] = nbytes
                    self._main_bytes += nbytes
                    self._freq[key] = 0
                    continue
            else:
                key, nbytes = next(iter(self._main.items()))
                if self._freq[key] > 0:
                    self._freq[key] -= 1
                    self._main.move_to_end(key)
                    continue
            self._victim = key
            return key
        return None

    def __len__(self) -> int:
        return len(self._freq)


class _RegisteredPolicies(Mapping[str, type[EvictionPolicy]]):
    """The policy table, served by the plugin registry (category ``eviction_policy``).

    Built-ins (``lru``, ``s3fifo``) come from the registry's built-in manifest; a package adds
    a policy with a manifest row. Looking a name up imports and checks that class only.
    """

    def __getitem__(self, name: str) -> type[EvictionPolicy]:
        try:
            return get_registry().get_class("eviction_policy", name)
        except PluginNotFoundError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(get_registry().names("eviction_policy"))

    def __len__(self) -> int:
        return len(get_registry().names("eviction_policy"))


POLICIES: Mapping[str, type[EvictionPolicy]] = _RegisteredPolicies()


def make_policy(name: str) -> EvictionPolicy:
    """Return a new policy instance by name; raise ValueError naming the known ones."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
    except PluginError as exc:
        raise ValueError(str(exc)) from exc
