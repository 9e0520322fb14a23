"""The arena allocator: buddy slots, generations as the clients read them, pins and zombies."""

from __future__ import annotations

import os

import pytest

from lmcached.shm.layout import ArenaReader, StaleSlot
from lmcached.storage.arena import Arena, slot_size

KIB = 1024


@pytest.fixture
def arena(tmp_path):
    a = Arena(str(tmp_path), "test", 0, data_size=1 << 20, descriptors=64, lease_timeout=60)
    yield a
    a.close()
    a.close()


def _commit(arena: Arena, data: bytes) -> int:
    index = arena.alloc(len(data))
    assert index is not None
    arena.payload(index)[:] = data
    arena.commit(index, 0)
    return index


def test_slots_are_powers_of_two_and_freed_buddies_merge_back(arena):
    assert slot_size(0) == 0 and slot_size(1) == 64 and slot_size(65) == 128
    assert slot_size(2 << 20) == 2 << 20
    halves = [_commit(arena, b"x" * (512 * KIB)) for _ in range(2)]
    assert arena.alloc(1) is None  # 1 MiB in two halves: full
    for i in halves:
        arena.release(i)
    assert arena.slot_bytes == 0
    whole = arena.alloc(1 << 20)  # the halves merged into one slot again
    assert whole is not None


def test_a_reader_sees_committed_bytes_and_a_freed_slot_as_stale(arena):
    data = os.urandom(1000)
    index = _commit(arena, data)
    reader = ArenaReader(arena.path)
    ref = arena.ref(index)
    buf = bytearray(1000)
    reader.copy_into(ref, memoryview(buf))
    assert bytes(buf) == data
    arena.release(index)
    with pytest.raises(StaleSlot):
        reader.copy_into(ref, memoryview(buf))
    again = _commit(arena, os.urandom(1000))  # same descriptor, new generation
    assert again == index and arena.ref(again).generation != ref.generation
    with pytest.raises(StaleSlot):
        reader.check(ref)
    reader.close()


def test_a_pinned_slot_outlives_its_removal_until_unpinned_or_expired(arena):
    data = os.urandom(4096)
    index = _commit(arena, data)
    ref = arena.ref(index)
    reader = ArenaReader(arena.path)
    pin = arena.pin([index])
    arena.release(index)
    assert arena.zombies == 1
    reader.check(ref)  # still valid for the lease holder
    assert bytes(reader.payload(ref)) == data
    arena.unpin(pin)
    assert arena.zombies == 0 and arena.slot_bytes == 0
    with pytest.raises(StaleSlot):
        reader.check(ref)
    other = _commit(arena, data)
    arena.pin([other], timeout=0)
    arena.release(other)
    assert arena.expire_pins() == 1 and arena.zombies == 0
    reader.close()


def test_the_arena_is_readable_by_the_group_only_and_unlinked_at_close(tmp_path):
    a = Arena(str(tmp_path), "mode", 3, data_size=1 << 16, descriptors=8)
    assert os.stat(a.path).st_mode & 0o777 == 0o640
    stale = Arena(str(tmp_path), "mode", 4, data_size=1 << 16, descriptors=8)
    # A new start of worker 3 removes what an earlier start (killed) left behind.
    b = Arena(str(tmp_path), "mode", 3, data_size=1 << 16, descriptors=8)
    assert not os.path.exists(a.path) and os.path.exists(stale.path)
    for x in (a, b, stale):
        x.close()
    assert os.listdir(tmp_path) == []


def test_a_cpu_tier_in_an_arena_evicts_by_its_budget_and_frees_slots(arena):
    from functools import partial

    from lmcached.storage.base import Block
    from lmcached.storage.cpu import CPUBackend, entry_cost
    from lmcached.storage.namespaces import NamespacedBackend

    cost = entry_cost(b"t/0", 64 * KIB, None, arena=True)
    tier = NamespacedBackend(
        8 * cost, {"t": 4 * cost}, make_partition=partial(CPUBackend, arena=arena)
    )
    for i in range(10):
        assert tier.put(b"t/%d" % i, Block.from_bytes(bytes([i]) * (64 * KIB)))
    stats = tier.stats()
    assert stats["evictions"] == 6 and stats["entries"] == 4
    # The partitions share the arena: its figures are counted once.
    assert stats["arena_slot_bytes"] == arena.slot_bytes == 4 * 64 * KIB
    block = tier.get(b"t/9")
    assert block is not None and block.slot is not None
    assert bytes(block.frames[0]) == bytes([9]) * (64 * KIB)
    # A block whose bytes do not match its checksum is refused, and its slot freed.
    assert not tier.put(b"bad", Block.from_bytes(b"x" * 100, checksum=1))
    assert arena.slot_bytes == 4 * 64 * KIB
