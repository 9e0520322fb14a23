"""Copying a block into its arena slot piece by piece, hashing each piece while it is in cache.

The sources of a same-host put (a client's memory, :class:`~lmcached.storage.peer_memory.
PeerRange`; a client's staging area or buffer, :class:`~lmcached.storage.arena.FileRange`)
copy pieces by address with the GIL released (``process_vm_readv``, memcpy, ``preadv``). So a
block is copied either on the calling thread alone, or by the calling thread (even pieces) and
a copy thread (odd pieces), piece k hashed by the thread that copied it once piece k-1 is
hashed; and the blocks of one put can be copied side by side
(:meth:`lmcached.storage.tiered.TieredStore.put_batch_steps`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Protocol

from lmcached.shm.addresses import held_address

__all__ = ["COPY_THREADS", "PIECE", "PieceSource", "copy_hashing", "held_address", "idle_core"]

# A piece is hashed right after its copy: measured here, 256 KiB pieces beat 1 MiB ones (the
# piece is still in cache).
PIECE = 256 << 10
# The caller's loop yields (serves other requests) after about this many bytes.
YIELD_EVERY = 1 << 20
# From this size a block is copied by two threads, PARALLEL_PIECE at a time. In a
# micro-benchmark on one 2-core host, one thread's process_vm_readv reached ~0.8x a memcpy
# and two, hashing too, ~0.95x. On another (2026-12-02), process_vm_readv reached only 0.43x
# of memmove per thread, memcpy from a mapped memfd with hashing 0.74x on one thread and
# 1.0-1.1x on two. Below this size the threads' wake-ups (each block pays two, in a VM tens
# of us each) ate the gain on 2 MiB blocks: those are spread over the threads whole instead.
PARALLEL_MIN = 8 << 20
PARALLEL_PIECE = 2 << 20
COPY_THREADS = 2
# How often a thread waiting for the previous piece's hash looks whether the copy was stopped.
STOP_POLL_S = 0.001

# (local address, offset in the source, bytes): copy with the GIL released; OSError if not.
CopyPiece = Callable[[int, int, int], object]


class PieceSource(Protocol):
    """Where a block's bytes come from on the same host."""

    @property
    def nbytes(self) -> int: ...

    def begin(self) -> None:
        """Raise OSError if a copy may not even start (the put's deadline has passed)."""
        ...

    def copy(self, local: int, at: int, n: int) -> object:
        """Copy ``n`` bytes at offset ``at`` to address ``local``, GIL released; OSError if not."""
        ...

    def vouch(self) -> None:
        """Raise OSError unless every piece copied so far may be served."""
        ...


def idle_core() -> bool:
    """Whether a second core is free to copy: no more runnable tasks than cores, us included.

    When the cores are busy (other workers copying too, say) the threads only take turns, and
    their in-order hashing waits on each other: one copy on the loop thread is faster then
    (measured here with four clients putting 32 MiB blocks: ~0.68x a memcpy with the threads,
    0.71-0.85x choosing so).
    """
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return True
    return running <= (os.cpu_count() or 1)


def copy_hashing(
    src: PieceSource, dst: memoryview, h: Any, pool: ThreadPoolExecutor | None = None
) -> Iterator[None]:
    """Copy ``src`` into ``dst``, hashing each piece into ``h`` right after its copy.

    With ``pool``, a block of PARALLEL_MIN or more is copied by the calling thread and one of
    ``pool``'s threads when a core is free. Yields every YIELD_EVERY bytes (every piece when
    split) so that the caller's loop can serve other requests.
    Raises OSError when a piece cannot be used, or when ``src`` cannot vouch for the copy
    after its last piece. Never returns, nor raises, while a copy thread may still write into
    ``dst``.
    """
    n = src.nbytes
    if n == 0:
        return
    # One export of the slot per block, and plain addresses per piece: the Python work per
    # piece was a quarter of a worker's time on 2 MiB puts.
    buf = (ctypes.c_char * n).from_buffer(dst)
    try:
        base = ctypes.addressof(buf)
        src.begin()
        copy = src.copy
        if pool is None or n < PARALLEL_MIN or not idle_core():
            since_yield = 0
            for at in range(0, n, PIECE):
                size = min(PIECE, n - at)
                copy(base + at, at, size)
                h.update(dst[at : at + size])
                since_yield += size
                if since_yield >= YIELD_EVERY:
                    since_yield = 0
                    yield
        else:
            yield from _copy_hashing_parallel(pool, copy, n, base, dst, h)
    finally:
        del buf  # the export of dst must end here, or its arena could never be unmapped
    src.vouch()


def _copy_hashing_parallel(
    pool: ThreadPoolExecutor, copy: CopyPiece, n: int, base: int, dst: memoryview, h: Any
) -> Iterator[None]:
    starts = range(0, n, PARALLEL_PIECE)
    # Piece k is hashed by the thread that copied it (in its cache), once piece k-1 is.
    hashed = [threading.Event() for _ in starts]
    stop = threading.Event()  # a piece failed, or the caller gave up: copy no more

    def piece(k: int) -> None:
        """Copy piece k, then hash it once piece k-1 is hashed; mark it hashed whatever happens."""
        try:
            at = starts[k]
            size = min(PARALLEL_PIECE, n - at)
            copy(base + at, at, size)
            while k and not hashed[k - 1].wait(STOP_POLL_S):
                if stop.is_set():
                    return
            if not stop.is_set():
                h.update(dst[at : at + size])
        except BaseException:
            stop.set()
            raise
        finally:
            hashed[k].set()

    def helper() -> None:
        # The odd pieces; the caller copies the even ones. One task for the whole block, and
        # the caller working rather than waiting: a task per piece, the caller waiting on
        # each, ran slower in a worker than one thread alone (8-9 against 10.4 GB/s, 32 MiB).
        for k in range(1, len(starts), 2):
            if stop.is_set():
                return
            piece(k)

    future = pool.submit(helper)
    try:
        for k in range(0, len(starts), 2):
            if stop.is_set():
                break  # the helper failed: its error is raised below
            piece(k)
            yield
        future.result()
    finally:
        stop.set()  # (done by now, unless we leave early)
        # The slot may be given back (or reused) once we return: no copy may still run.
        wait([future])
