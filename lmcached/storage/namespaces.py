"""Namespace quotas for the CPU tier: one tenant's puts never evict another tenant's blocks.

A namespace is the leading part of a key up to the first ``/``; keys built by
:mod:`lmcached.keys` start with ``<namespace>/``, so ``KeyBuilder(namespace="tenant-a")`` (or a
cache_salt turned into a namespace) selects it. Each namespace with a quota gets its own
partition of the tier: a CPU tier of exactly its quota with its own eviction policy. Keys of
every other namespace share what is left of the budget. A quota is therefore both a
reservation and a cap: tenant A filling its partition evicts only A's blocks, and B keeps
everything up to B's quota whatever A does.

Reserved bytes that a tenant does not use are not lent to others. That is the price of a
guarantee that holds under any access pattern, and it keeps each partition an ordinary tier.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lmcached.storage.base import Block, StorageBackend, Usage
from lmcached.storage.cpu import ArenaWrite, CPUBackend

SHARED = ""  # the partition of keys whose namespace has no quota


def namespace_of(key: bytes) -> str:
    """Return the key's namespace: the text before the first '/' ('' when there is none)."""
    head, sep, _ = key.partition(b"/")
    if not sep:
        return SHARED
    return head.decode("utf-8", errors="replace")


class NamespacedBackend(StorageBackend):
    """A CPU tier split into one partition per namespace quota plus a shared remainder."""

    name = "cpu"

    def __init__(
        self,
        capacity_bytes: int,
        quotas: Mapping[str, int],
        policy: str = "lru",
        make_partition: Callable[[int, str], StorageBackend] = CPUBackend,
    ) -> None:
        reserved = sum(quotas.values())
        if reserved > capacity_bytes:
            raise ValueError(
                f"namespace quotas ({reserved} bytes) exceed the tier's budget ({capacity_bytes})"
            )
        self.capacity = capacity_bytes
        self.quotas = dict(quotas)
        self._partitions: dict[str, StorageBackend] = {
            ns: make_partition(quota, policy) for ns, quota in self.quotas.items()
        }
        self._shared = make_partition(capacity_bytes - reserved, policy)
        self._closed = False

    @property
    def on_evict(self) -> Callable[[bytes, Block], None] | None:
        """The eviction hook (write-back policy of the TieredStore), shared by every partition."""
        return getattr(self._shared, "on_evict", None)

    @on_evict.setter
    def on_evict(self, hook: Callable[[bytes, Block], None] | None) -> None:
        for partition in self._all():
            partition.on_evict = hook  # type: ignore[attr-defined]

    def _partition(self, key: bytes) -> StorageBackend:
        return self._partitions.get(namespace_of(key), self._shared)

    def _all(self) -> list[StorageBackend]:
        return [*self._partitions.values(), self._shared]

    def contains(self, key: bytes) -> bool:
        return self._partition(key).contains(key)

    def get(self, key: bytes) -> Block | None:
        return self._partition(key).get(key)

    def put(self, key: bytes, block: Block) -> bool:
        # The partition evicts by its own policy within its own budget, never across.
        return self._partition(key).put(key, block)

    def start_put(
        self, key: bytes, block: Block, keep_buffers: bool = False, defer: bool = False
    ) -> ArenaWrite | bool:
        """CPUBackend.start_put in the key's partition (a put in steps, see TieredStore)."""
        part = self._partition(key)
        if isinstance(part, CPUBackend):
            return part.start_put(key, block, keep_buffers, defer)
        return part.put(key, block)

    def settle(self, keys: Sequence[bytes]) -> int:
        """CPUBackend.settle, each key in its partition."""
        return sum(
            part.settle([key])
            for key in keys
            if isinstance(part := self._partition(key), CPUBackend)
        )

    def remove(self, key: bytes) -> bool:
        return self._partition(key).remove(key)

    def iter_keys(self) -> Iterator[bytes]:
        return itertools.chain.from_iterable(p.iter_keys() for p in self._all())

    def usage(self) -> Usage:
        usages = [p.usage() for p in self._all()]
        return Usage(
            used_bytes=sum(u.used_bytes for u in usages),
            capacity_bytes=self.capacity,
            entries=sum(u.entries for u in usages),
        )

    def namespace_stats(self) -> dict[str, dict[str, int]]:
        """Per quota'd namespace: used and quota bytes, blocks, evictions, rejected puts."""
        out = {}
        for ns, part in self._partitions.items():
            s = part.stats()
            out[ns] = {
                "used_bytes": int(s.get("used_bytes", 0)),
                "quota_bytes": self.quotas[ns],
                "entries": int(s.get("entries", 0)),
                "evictions": int(s.get("evictions", 0)),
                "rejected": int(s.get("rejected", 0)),
            }
        return out

    def stats(self) -> dict[str, Any]:
        # The tier's counters are the partitions' sums, so metrics see one "cpu" tier.
        total: dict[str, Any] = {}
        for part in self._all():
            for k, v in part.stats().items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        total["capacity_bytes"] = self.capacity
        # The partitions share one arena: its figures are counted once, not summed.
        shared = self._shared.stats()
        for k in ("arena_slot_bytes", "arena_pinned", "arena_zombies"):
            if k in shared:
                total[k] = shared[k]
        total["namespaces"] = self.namespace_stats()
        return total

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for part in self._all():
            part.close()
