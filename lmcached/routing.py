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
from collections.abc import Sequence
from itertools import repeat

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


def shared_route(keys: Sequence[bytes]) -> bytes | None:
    """Return the 8-hex route that every key of ``keys`` carries, or None if they do not share one.

    A prompt's chunk keys all carry their first chunk's route, so one owner computation serves
    the whole chain (``owner`` per key costs ~1-3 us: a fresh 128-key prompt would pay 100s of
    us). The test is two C-level passes that allocate nothing: every key starts with the first
    key's text up to its route and ``-``, and has no ``/`` after that, so its last segment
    starts with the same route. None means "ask per key", never a different answer: when this
    returns a route, ``route_of`` returns it for every key.
    """
    if not keys:
        return None
    first = keys[0]
    start = first.rfind(b"/") + 1
    head = first[start : start + 9]
    if not _ROUTE.fullmatch(head):
        return None
    lead = first[: start + 9]
    if not all(map(bytes.startswith, keys, repeat(lead))):
        return None
    if max(map(bytes.find, keys, repeat(b"/"), repeat(len(lead)))) != -1:
        return None
    return head[:8]


def route_owner(route: bytes, num_workers: int) -> int:
    """Return the id of the worker that owns every key whose route is ``route``."""
    return jump_hash(xxhash.xxh3_64_intdigest(route), num_workers)


@functools.lru_cache(maxsize=1 << 16)
def cached_owner(key: bytes, num_workers: int) -> int:
    """``owner`` with a bounded cache: engines look up, get and put the same keys repeatedly."""
    return owner(key, num_workers)
