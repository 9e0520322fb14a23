"""Which worker owns a key: jump consistent hash over a stable 64-bit hash of the key's route.

Jump hash (Lamping & Veach, 2014) moves only 1/N of the keys when a worker is added and needs
no ring state. The 64-bit input is xxh3-64 (the same in every process and on every host, never
Python's salted ``hash()``) of the key's route:

- a key whose last ``/``-separated segment starts with 8 lowercase hex digits and a ``-`` (the
  keys that :mod:`lmcached.keys` builds: ``<route>-<chunk hash>``) is routed by those 8 bytes.
  Every chunk of one prompt carries the route of the prompt's first chunk, so a prompt's whole
  chain lives on one worker and its lookup is one round trip to one process;
- any other key is routed by the whole key.
"""

from __future__ import annotations

import functools
import re

import xxhash

_MASK = (1 << 64) - 1
# 8 lowercase hex digits then '-' at the start of the last segment; fullmatch on 9 bytes.
_ROUTE = re.compile(rb"[0-9a-f]{8}-")


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


def route_of(key: bytes) -> bytes:
    """Return the bytes that decide ``key``'s owner: its 8-hex route, else the whole key."""
    start = key.rfind(b"/") + 1
    if _ROUTE.fullmatch(key, start, start + 9):
        return key[start : start + 8]
    return key


def owner(key: bytes, num_workers: int) -> int:
    """Return the id of the worker that owns ``key``."""
    return jump_hash(xxhash.xxh3_64_intdigest(route_of(key)), num_workers)


@functools.lru_cache(maxsize=1 << 16)
def cached_owner(key: bytes, num_workers: int) -> int:
    """``owner`` with a bounded cache: engines look up, get and put the same keys repeatedly."""
    return owner(key, num_workers)
