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


def test_the_presence_index_counts_the_leading_keys_the_tier_holds(arena):
    reader = ArenaReader(arena.path)
    keys = [b"chain/%d" % i for i in range(40)]
    arena.set_final_misses(True)
    assert reader.leading_present(keys) == 0
    for k in keys[:30]:
        arena.index_key(k)
    assert reader.leading_present(keys) == 30
    arena.unindex_key(keys[7])  # a block that left the tier ends the prefix there
    assert reader.leading_present(keys) == 7
    assert reader.present(keys[6:9]) == [True, False, True]
    arena.set_final_misses(False)  # a lower tier may hold what the index lacks: ask the worker
    assert reader.leading_present(keys) is None
    assert reader.present(keys[6:9]) is None
    assert reader.leading_present(keys[:7]) == 7  # a full hit needs no worker
    assert reader.present(keys[:3]) == [True] * 3
    reader.close()


def test_a_key_that_found_no_free_way_makes_the_index_misses_not_final(tmp_path):
    # One descriptor: one bucket of 8 ways, so the ninth key has nowhere to go.
    a = Arena(str(tmp_path), "test", 0, data_size=1 << 20, descriptors=1, lease_timeout=60)
    reader = ArenaReader(a.path)
    a.set_final_misses(True)
    keys = [b"k%d" % i for i in range(9)]
    for k in keys:
        a.index_key(k)
    assert reader.leading_present(keys[:8]) == 8
    # The ninth is held but unindexed: its miss must not be taken for final.
    assert reader.leading_present(keys) is None
    assert reader.leading_present([b"absent"]) is None
    a.unindex_key(keys[8])
    assert reader.leading_present([b"absent"]) == 0
    a.close()
    reader.close()


def test_a_closed_or_retired_arena_index_answers_no_lookup(tmp_path):
    from lmcached.shm.layout import retire_arena

    a = Arena(str(tmp_path), "test", 0, data_size=1 << 20, descriptors=64, lease_timeout=60)
    b = Arena(str(tmp_path), "test", 1, data_size=1 << 20, descriptors=64, lease_timeout=60)
    readers = [ArenaReader(a.path), ArenaReader(b.path)]
    for arena in (a, b):
        arena.set_final_misses(True)
        arena.index_key(b"held")
    assert [r.leading_present([b"held"]) for r in readers] == [1, 1]
    a.close()  # a worker that stops
    retire_arena(b.path)  # what the scheduler does for a worker killed with kill -9
    assert [r.leading_present([b"held"]) for r in readers] == [None, None]
    b.close()
    for r in readers:
        r.close()


def test_the_index_of_an_arena_whose_process_was_killed_answers_no_lookup(tmp_path):
    import signal
    import subprocess
    import sys
    import textwrap

    # The worker had no chance to retire its index: its lock on the file says it is gone.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from lmcached.storage.arena import Arena
                a = Arena({str(tmp_path)!r}, "test", 0, data_size=1 << 20, descriptors=64)
                a.set_final_misses(True)
                a.index_key(b"held")
                print(a.path, flush=True)
                time.sleep(600)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        reader = ArenaReader(child.stdout.readline().strip())
        assert reader.leading_present([b"held", b"absent"]) == 1
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        assert reader.leading_present([b"held"]) is None
        reader.close()
    finally:
        child.kill()
        child.wait()


def _backed_bytes(arena: Arena) -> int:
    return os.stat(arena.path).st_blocks * 512


def test_an_unbacked_reservation_takes_the_high_end_and_gives_its_pages_back(arena):
    # Fill the arena through the mapping, so tmpfs backs every page, then free it all.
    halves = [_commit(arena, b"x" * (512 * KIB)) for _ in range(2)]
    for i in halves:
        arena.release(i)
    backed = _backed_bytes(arena)
    index = arena.alloc(256 * KIB, unbacked=True)
    assert index is not None
    assert arena.ref(index).offset == 768 * KIB  # the highest free slot
    assert backed - _backed_bytes(arena) == 256 * KIB  # its pages went back to the kernel
    assert bytes(arena.payload(index)[:16]) == bytes(16)  # and read as zeros
    low = arena.alloc(256 * KIB)  # an ordinary slot takes the lowest free slot of its size
    assert low is not None and arena.ref(low).offset == 512 * KIB
    arena.release(index)
    arena.release(low)
    assert arena.slot_bytes == 0
    assert arena.alloc(1 << 20) is not None  # everything merged back


def test_a_block_kept_in_its_own_buffers_holds_budget_and_a_slot_but_no_arena_bytes(arena):
    from lmcached.storage.base import Block
    from lmcached.storage.cpu import CPUBackend, entry_cost

    cost = entry_cost(b"k0", 128 * KIB, None, arena=True)
    tier = CPUBackend(4 * cost, arena=arena)
    frames = [bytearray(os.urandom(64 * KIB)) for _ in range(2)]
    block = Block(frames=tuple(frames), nbytes=128 * KIB)
    assert tier.start_put(b"k0", block, keep_buffers=True) is True
    held = tier.get(b"k0")
    assert held is not None and held.slot is None  # no slot a client could read
    assert held.frames[0] is frames[0]  # the buffers themselves: no copy
    assert tier.stats()["entries_outside_arena"] == 1
    assert arena.slot_bytes == 128 * KIB and tier.usage().used_bytes == cost
    # Both kinds of entry evict by one budget, and an evicted one frees its slot.
    for i in range(1, 5):
        assert tier.put(b"k%d" % i, Block.from_bytes(os.urandom(128 * KIB)))
    assert not tier.contains(b"k0")
    assert tier.stats()["entries_outside_arena"] == 0
    assert arena.slot_bytes == 4 * 128 * KIB
    tier.close()


def test_a_block_kept_in_its_own_buffers_settles_into_its_slot_when_read_from_shared_memory(
    arena,
):
    from lmcached.storage.base import Block
    from lmcached.storage.cpu import CPUBackend

    tier = CPUBackend(1 << 20, arena=arena)
    data = os.urandom(256 * KIB)
    block = Block(frames=(data[: 100 * KIB], data[100 * KIB :]), nbytes=256 * KIB)
    assert tier.start_put(b"k0", block, keep_buffers=True) is True
    backed = _backed_bytes(arena)
    assert tier.settle([b"k0", b"absent"]) == 1
    assert tier.settle([b"k0"]) == 0  # once
    held = tier.get(b"k0")
    assert held is not None and held.slot is not None and held.tobytes() == data
    assert tier.stats()["entries_outside_arena"] == 0 and tier.stats()["settled"] == 1
    assert _backed_bytes(arena) - backed == 256 * KIB  # the slot's pages now hold the bytes
    reader = ArenaReader(arena.path)
    assert bytes(reader.payload(arena.ref(held.slot))) == data  # committed: a client reads it
    reader.close()
    # Freed, the slot's pages are the arena's: a later unbacked reservation gives them back.
    assert tier.remove(b"k0")
    index = arena.alloc(256 * KIB, unbacked=True)
    assert index is not None and _backed_bytes(arena) == backed
    tier.close()


def test_a_kept_block_whose_bytes_changed_since_its_put_is_dropped_when_it_settles(arena):
    import xxhash

    from lmcached.storage.base import Block
    from lmcached.storage.cpu import CPUBackend

    tier = CPUBackend(1 << 20, arena=arena)
    frame = bytearray(os.urandom(64 * KIB))
    block = Block(frames=(frame,), nbytes=len(frame), checksum=xxhash.xxh3_64_intdigest(frame))
    started = tier.start_put(b"k0", block, keep_buffers=True)
    assert started is True or started.finish()  # checked against its checksum at put
    frame[0] ^= 0xFF  # a fault in the worker's heap after the put
    assert tier.settle([b"k0"]) == 0
    assert tier.get(b"k0") is None  # never served: not from the arena, nor over ZMQ
    assert tier.stats()["errors"] == 1 and arena.slot_bytes == 0
    assert tier.settle([b"k0"]) == 0  # and not copied again
    tier.close()
