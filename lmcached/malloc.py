"""Tune glibc malloc so that large ZMQ messages reuse heap memory instead of fresh mmaps.

glibc serves every allocation above M_MMAP_THRESHOLD with a new mmap and unmaps it on free, so
each large received message pays one page fault per 4 KiB (measured here: 32 MiB blocks drop
from ~5 GB/s to ~1.6 GB/s). Raising the threshold to its maximum (32 MiB on 64-bit) and keeping
freed memory (M_TRIM_THRESHOLD) lets libzmq's buffers come from the heap; payloads travel in
sub-frames of at most 16 MiB so every buffer stays below the threshold. Users never have to set
GLIBC_TUNABLES.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from lmcached.glibc import glibc_function

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# Opt-in for client processes that call Client.get on blocks above 16 MiB: serve every
# allocation from the heap, so the joined buffer reuses freed memory instead of fresh pages.
NO_MMAP_ENV = "LMCACHED_MALLOC"
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = 512 << 20

_applied: bool | None = None


def tune_for_large_messages(daemon: bool = False) -> bool:
    """Apply the mallopt settings once per process; return True when glibc accepted them.

    ``daemon`` also limits malloc to one arena. libzmq allocates received messages on its I/O
    thread, whose arena lives in 64 MiB heaps that glibc unmaps whenever one empties, whatever
    the trim threshold: every received block then lands in fresh, faulting pages (measured
    here: 32 MiB stores at ~4.2 GB/s, ~5.3 GB/s with one arena). Only lmcached's own processes
    do this; a client library must not change an engine's allocator that much.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    mallopt = glibc_function("mallopt")
    if mallopt is None:  # not Linux, or musl and other libcs without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if daemon:
        ok = bool(mallopt(M_ARENA_MAX, 1)) and ok
    if os.environ.get(NO_MMAP_ENV) == "no-mmap":
        # Measured here: joining a 32 MiB block into fresh pages takes ~17 ms (the kernel
        # zeroes and maps 8k pages); from reused heap memory ~1.5 ms. Process-wide, so opt-in.
        ok = bool(mallopt(M_MMAP_MAX, 0)) and ok
    _applied = ok
    return ok


def release_free_memory() -> bool:
    """Give the heap's free pages back to the kernel (glibc ``malloc_trim(0)``).

    The daemon keeps freed memory (M_TRIM_THRESHOLD above) so that blocks reuse it; after an
    oversized message was dropped, that memory is no cache's and must not stay resident.
    Returns True when glibc released something; False elsewhere (musl, macOS).
    """
    trim = glibc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_mallinfo2: Any = None  # loaded once: a CDLL per call would leave ctypes cycles to the GC


def heap_usage() -> dict[str, int] | None:
    """Return glibc's view of the heap: bytes in use, bytes free but kept, and mmapped bytes.

    RSS alone cannot tell a leak (``in_use`` grows) from memory freed but kept by the allocator
    (``free`` grows: fragmentation, or the trim threshold above). None where glibc's
    ``mallinfo2`` is missing (glibc < 2.33, musl, macOS).
    """
    global _mallinfo2
    if _mallinfo2 is None:
        fn = glibc_function("mallinfo2")
        if fn is None:
            return None
        fn.restype = _MallInfo2
        fn.argtypes = []
        _mallinfo2 = fn
    info = _mallinfo2()
    return {
        "in_use": int(info.uordblks) + int(info.hblkhd),
        "free": int(info.fordblks),
        "mmapped": int(info.hblkhd),
        "arena": int(info.arena),
    }
