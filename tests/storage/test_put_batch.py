"""A same-host put's blocks copied side by side (TieredStore.put_batch_steps), for real.

The sources are this very process's memory (process_vm_readv of one's own pid is allowed) and a
sealed memfd mapped read-only, as a worker maps a client's ``Client.buffer``; the copies run on
a real thread pool into a real arena.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

from lmcached.storage.arena import Arena, FileRange, Stage
from lmcached.storage.base import Block
from lmcached.storage.cpu import CPUBackend
from lmcached.storage.peer_memory import PeerRange
from lmcached.storage.piece_copy import held_address
from lmcached.storage.tiered import TieredStore

MIB = 1 << 20
LATER = 60 * 10**9


@pytest.fixture
def store(tmp_path) -> Iterator[tuple[TieredStore, Arena]]:
    arena = Arena(str(tmp_path), "test", 0, data_size=64 * MIB, descriptors=256, lease_timeout=60)
    store = TieredStore([CPUBackend(64 * MIB, arena=arena)])
    yield store, arena
    store.close()


def _memfd_stage(data: bytes) -> Stage:
    fd = os.memfd_create("lmcached-test", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mapping = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ)
    return Stage(fd, memoryview(mapping))


def _run(steps) -> list[bool]:
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def _stored(store: TieredStore, key: bytes) -> bytes | None:
    block = store.top.get(key)
    return None if block is None else block.tobytes()


def test_a_batch_from_a_buffer_stores_each_block_whole_and_refuses_a_wrong_checksum(store, pool):
    tier, _ = store
    sizes = [0, 1, 300 * 1024, 2 * MIB + 1, 256 * 1024, 3 * MIB, 7, MIB]
    data = os.urandom(sum(sizes))
    stage = _memfd_stage(data)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    blocks = [data[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
    items = []
    with held_address(stage.mapped) as base:  # as the worker holds it: copies by memcpy
        for i, (off, n) in enumerate(zip(offsets, sizes, strict=True)):
            checksum = xxhash.xxh3_64_intdigest(blocks[i]) ^ (1 if i == 4 else 0)
            src = FileRange(stage, off, n, time.monotonic_ns() + LATER, base=base + off)
            items.append((b"k%d" % i, Block(frames=(src,), nbytes=n, checksum=checksum)))
        stored = _run(tier.put_batch_steps(items, pool))
    assert stored == [i != 4 for i in range(len(sizes))]
    for i, block in enumerate(blocks):
        assert _stored(tier, b"k%d" % i) == (None if i == 4 else block)
    kept = tier.top.get(b"k3")
    assert kept is not None and kept.slot is not None  # in the arena, not the client's memfd
    assert kept.checksum == xxhash.xxh3_64_intdigest(blocks[3])


def test_a_block_that_cannot_be_read_fails_alone(store, pool, me):
    tier, arena = store
    region = mmap.mmap(-1, 8 * MIB)
    addr = int(np.frombuffer(region, dtype=np.uint8).ctypes.data)
    region[:] = os.urandom(8 * MIB)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr + 4 * MIB + 4096, 4096, 0) == 0  # a hole in block 2
    until = time.monotonic_ns() + LATER
    items = [
        (
            b"k%d" % i,
            Block(frames=(PeerRange(me, addr + i * 2 * MIB, 2 * MIB, until),), nbytes=2 * MIB),
        )
        for i in range(4)
    ]
    assert _run(tier.put_batch_steps(items, pool)) == [True, True, False, True]
    assert _stored(tier, b"k3") == bytes(region[6 * MIB :])
    # The failed block's slot is free again: three 2 MiB blocks' worth are in use.
    assert arena.slot_bytes == 3 * 2 * MIB


def test_a_block_read_after_its_deadline_is_not_stored(store, pool):
    tier, _ = store
    data = os.urandom(4 * MIB)
    stage = _memfd_stage(data)
    now = time.monotonic_ns()
    items = [
        (b"late", Block(frames=(FileRange(stage, 0, 2 * MIB, now - 1),), nbytes=2 * MIB)),
        (b"fine", Block(frames=(FileRange(stage, 2 * MIB, 2 * MIB, now + LATER),), nbytes=2 * MIB)),
    ]
    assert _run(tier.put_batch_steps(items, pool)) == [False, True]
    assert _stored(tier, b"fine") == data[2 * MIB :]


def test_a_batch_closed_halfway_gives_every_slot_back_and_stops_copying(store, pool, me):
    tier, arena = store
    data = np.frombuffer(os.urandom(48 * MIB), dtype=np.uint8)
    addr = int(data.ctypes.data)
    until = time.monotonic_ns() + LATER
    items = [
        (
            b"k%d" % i,
            Block(frames=(PeerRange(me, addr + i * 4 * MIB, 4 * MIB, until),), nbytes=4 * MIB),
        )
        for i in range(12)
    ]
    steps = tier.put_batch_steps(items, pool)
    next(steps)  # the first piece is in, and the helper thread is copying another block
    assert arena.slot_bytes == 12 * 4 * MIB  # every slot reserved up front
    steps.close()  # as when the worker drops the put
    assert arena.slot_bytes == 0 and tier.top.usage().used_bytes == 0
    assert pool.submit(lambda: True).result(timeout=10)  # the helper has let go of the pool
    assert all(tier.top.get(key) is None for key, _ in items)
    # The slots are whole again: the same put, run to its end, stores everything.
    assert _run(tier.put_batch_steps(items, pool)) == [True] * 12
    assert _stored(tier, b"k11") == data[44 * MIB :].tobytes()
