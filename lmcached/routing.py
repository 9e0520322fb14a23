"""Which worker owns a key: jump consistent hash over a stable 64-bit key hash.

Jump hash (Lamping & Veach, 2014) moves only 1/N of the keys when a worker is added and needs
no ring state. The 64-bit input is xxh3-64 of the key, which is the same in every process and on
every host (never Python's salted ``hash()``).
"""

from __future__ import annotations

import functools

import xxhash

_MASK = (1 << 64) - 1


def jump_hash(key: int, buckets: int) -> int:
    """Map a 64-bit integer to a bucket in [0, buckets)."""
    if buckets <= 0:
        raise ValueError("buckets must be positive")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) & _MASK
        j = int((b + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return b


def owner(key: bytes, num_workers: int) -> int:
    """Return the id of the worker that owns ``key``."""
    return jump_hash(xxhash.xxh3_64_intdigest(key), num_workers)


@functools.lru_cache(maxsize=1 << 16)
def cached_owner(key: bytes, num_workers: int) -> int:
    """``owner`` with a bounded cache: engines look up, get and put the same keys repeatedly."""
    return owner(key, num_workers)
