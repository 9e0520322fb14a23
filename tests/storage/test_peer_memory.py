"""Copying a block out of a process's memory (a direct put's source), on this very process.

process_vm_readv of one's own pid is allowed, so these run the worker's copy code for real:
both the one-thread copy and the two-thread copy with in-order hashing, and their failures;
and the same for a mapped memfd (a Client.buffer), copied by memcpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

from lmcached.storage import piece_copy
from lmcached.storage.arena import FileRange, Stage
from lmcached.storage.peer_memory import PeerGone, PeerRange

MIB = 1 << 20


def _address(buf: object) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)  # type: ignore[call-overload]


def _copy(src: PeerRange, dst: bytearray) -> int:
    h = xxhash.xxh3_64()
    for _ in piece_copy.copy_hashing(src, memoryview(dst), h, src.pool):
        pass
    return h.intdigest()


@pytest.mark.parametrize("threads", [True, False], ids=["two-threads", "loop-thread"])
def test_a_block_is_copied_whole_and_hashed_in_order(me, pool, monkeypatch, threads):
    monkeypatch.setattr(piece_copy, "idle_core", lambda: threads)
    data = os.urandom(21 * MIB + 12345)  # not a whole number of pieces
    dst = bytearray(len(data))
    until = time.monotonic_ns() + 60 * 10**9
    src = PeerRange(me, _address(data), len(data), until, pool)
    assert _copy(src, dst) == xxhash.xxh3_64_intdigest(data)
    assert dst == data


@pytest.mark.parametrize("threads", [True, False], ids=["two-threads", "loop-thread"])
def test_an_unreadable_piece_fails_the_block(me, pool, monkeypatch, threads):
    monkeypatch.setattr(piece_copy, "idle_core", lambda: threads)
    region = mmap.mmap(-1, 16 * MIB)
    addr = _address(region)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr + 10 * MIB, 6 * MIB, 0) == 0  # PROT_NONE from 10 MiB on
    dst = bytearray(16 * MIB)
    with pytest.raises(OSError):
        _copy(PeerRange(me, addr, 16 * MIB, time.monotonic_ns() + 60 * 10**9, pool), dst)


def test_a_piece_read_after_the_deadline_fails_the_block(me):
    data = os.urandom(MIB)
    with pytest.raises(PeerGone):
        _copy(PeerRange(me, _address(data), len(data), time.monotonic_ns() - 1), bytearray(MIB))


def test_a_copy_abandoned_halfway_writes_nothing_after_it_returns(me, pool, monkeypatch):
    monkeypatch.setattr(piece_copy, "idle_core", lambda: True)
    data = os.urandom(64 * MIB)
    dst = bytearray(len(data))
    steps = PeerRange(me, _address(data), len(data), time.monotonic_ns() + 60 * 10**9, pool)
    copying = piece_copy.copy_hashing(steps, memoryview(dst), xxhash.xxh3_64(), pool)
    next(copying)  # the first piece is in; the threads are on the next ones
    copying.close()  # as when the put is dropped: its slot is about to be given back
    after = bytes(dst)
    time.sleep(0.05)
    assert bytes(dst) == after  # no copy thread wrote into the slot after close() returned


@contextlib.contextmanager
def _memfd_range(data: bytes, until_ns: int, pool) -> Iterator[FileRange]:
    """A mapped memfd, as a worker maps a client's Client.buffer: copied by memcpy."""
    fd = os.memfd_create("lmcached-test")
    try:
        os.write(fd, data)
        mapping = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ)
        view = memoryview(mapping)
        try:
            yield FileRange(Stage(fd, view), 0, len(data), until_ns, pool, base=_address(mapping))
        finally:
            view.release()
            mapping.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("threads", [True, False], ids=["two-threads", "loop-thread"])
def test_a_large_block_from_a_buffer_is_copied_whole_and_hashed_in_order(
    pool, monkeypatch, threads
):
    # The worker splits a large block from a Client.buffer over its copy threads too.
    monkeypatch.setattr(piece_copy, "idle_core", lambda: threads)
    data = os.urandom(19 * MIB + 4321)
    dst = bytearray(len(data))
    with _memfd_range(data, time.monotonic_ns() + 60 * 10**9, pool) as src:
        assert _copy(src, dst) == xxhash.xxh3_64_intdigest(data)
    assert dst == data


def test_a_large_block_from_a_buffer_read_past_its_deadline_fails(pool, monkeypatch):
    monkeypatch.setattr(piece_copy, "idle_core", lambda: True)
    data = os.urandom(16 * MIB)
    with _memfd_range(data, time.monotonic_ns() - 1, pool) as src, pytest.raises(OSError):
        _copy(src, bytearray(len(data)))
