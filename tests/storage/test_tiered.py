"""The TieredStore over real tiers (CPU, disk folder, redis-server), without a daemon."""

from __future__ import annotations

import threading

import pytest
import xxhash

from lmcached.storage.arena import Arena
from lmcached.storage.base import Block, StorageBackend, Usage
from lmcached.storage.cpu import CPUBackend, entry_cost
from lmcached.storage.disk import DiskBackend
from lmcached.storage.remote import RemoteBackend, make_connector
from lmcached.storage.tiered import TieredStore

KiB = 1 << 10
MiB = 1 << 20


def _block(i: int, size: int = 64 * KiB) -> Block:
    return Block.from_bytes(bytes([i % 251]) * size)


def _data(block: Block | None) -> bytes | None:
    return None if block is None else block.tobytes()


@pytest.fixture
def stack(tmp_path, redis_server):
    cpu = CPUBackend(3 * entry_cost(b"k0", 64 * KiB, None, arena=False))  # room for three
    disk = DiskBackend(str(tmp_path / "disk"), 0, 6 * 70 * KiB)  # room for six
    remote = RemoteBackend(make_connector(redis_server.url, timeout=1.0))
    store = TieredStore([cpu, disk, remote])
    yield store
    store.close()


def test_cpu_eviction_is_followed_by_a_disk_hit_and_a_promotion(stack: TieredStore) -> None:
    for i in range(5):
        assert stack.put(f"k{i}".encode(), _block(i))
    assert stack.flush(10)
    assert stack.get_cached_many([b"k0"]) == [None]  # evicted from CPU
    assert _data(stack.get(b"k0")) == _data(_block(0))
    stats = stack.stats()
    assert stats["disk"]["hits"] == 1 and stats["remote"]["hits"] == 0
    assert _data(stack.get_cached_many([b"k0"])[0]) == _data(_block(0))  # promoted


def test_a_disk_miss_is_followed_by_a_remote_hit(stack: TieredStore) -> None:
    for i in range(8):  # disk keeps six, the remote keeps all
        stack.put(f"k{i}".encode(), _block(i))
    assert stack.flush(10)
    assert not stack.tier("disk").contains(b"k0")
    assert _data(stack.get(b"k0")) == _data(_block(0))
    stats = stack.stats()
    assert stats["remote"]["hits"] == 1 and stats["disk"]["misses"] >= 1
    assert stats["remote"]["get_latency"]["count"] >= 1
    # The remote hit was promoted into CPU and queued for disk too.
    assert stack.flush(10) and stack.tier("disk").contains(b"k0")


def test_lookup_exists_delete_and_purge_reach_every_tier(stack: TieredStore) -> None:
    keys = [f"p/{i}".encode() for i in range(8)] + [b"other/0"]
    for i, k in enumerate(keys):
        stack.put(k, _block(i, 1 * KiB))
    stack.flush(10)
    assert stack.lookup([*keys[:3], b"absent", keys[4]]) == 3
    assert stack.exists_many([keys[0], b"absent"]) == [True, False]
    assert stack.remove_many([keys[0], b"absent"]) == 1
    assert stack.exists_many([keys[0]]) == [False]
    assert all(not t.contains(keys[0]) for t in stack.tiers)
    assert stack.remove_prefix(b"p/") == 7
    assert stack.exists_many(keys) == [False] * 8 + [True]


def test_delete_cancels_a_queued_write(tmp_path) -> None:
    gate = threading.Event()

    class SlowTier(DiskBackend):
        def put_many(self, items):
            gate.wait(10)
            return super().put_many(items)

    slow = SlowTier(str(tmp_path), 0, 10 * MiB)
    store = TieredStore([CPUBackend(10 * MiB), slow])
    store.put(b"first", _block(1))  # in flight, held at the gate
    store.put(b"doomed", _block(2))  # queued behind it
    assert store.remove_many([b"doomed"]) == 1
    gate.set()
    assert store.flush(10)
    assert slow.contains(b"first") and not slow.contains(b"doomed")
    store.close()


class _StuckTier(StorageBackend):
    """A lower tier whose writes block until released: makes the write queue fill up."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stored: dict[bytes, Block] = {}

    def contains(self, key):
        return key in self.stored

    def get(self, key):
        return self.stored.get(key)

    def put(self, key, block):
        self.release.wait(10)
        self.stored[key] = block
        return True

    def remove(self, key):
        return self.stored.pop(key, None) is not None

    def iter_keys(self):
        return iter(list(self.stored))

    def usage(self):
        return Usage(0, 0, len(self.stored))

    def close(self):
        self.release.set()


def test_a_block_evicted_from_cpu_is_served_from_its_write_queue() -> None:
    stuck = _StuckTier()
    store = TieredStore([CPUBackend(64 * KiB), stuck])
    store.put(b"a", _block(1))  # taken by the writer, held in flight
    store.put(b"b", _block(2))  # evicts a from CPU; queued behind it
    assert store.get_cached_many([b"a", b"b"])[0] is None
    assert [_data(b) for b in store.get_many([b"a", b"b"])] == [
        _data(_block(1)),
        _data(_block(2)),
    ]
    assert store.exists_many([b"a", b"c"]) == [True, False]
    stuck.release.set()
    store.close()


def test_full_queue_drops_and_counts_without_blocking() -> None:
    stuck = _StuckTier()
    store = TieredStore([CPUBackend(100 * MiB), stuck], queue_max_bytes=4 * 64 * KiB)
    for i in range(10):
        assert store.put(f"k{i}".encode(), _block(i))  # acknowledged: it is in CPU
    stats = store.stats()["stuck"]
    assert stats["queue_drops"] >= 5 and stats["queue"]["queued"] <= 4
    assert not store.flush(0.05)  # still stuck, and flush says so
    stuck.release.set()
    assert store.flush(10)
    store.close()


def test_close_drains_the_queues(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 100 * MiB)
    store = TieredStore([CPUBackend(100 * MiB), disk], shutdown_flush_timeout=30)
    for i in range(20):
        store.put(f"k{i}".encode(), _block(i))
    assert store.close()
    again = DiskBackend(str(tmp_path), 0, 100 * MiB)
    assert again.usage().entries == 20
    store.close()


def test_write_back_writes_lower_tiers_on_eviction_and_at_close(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 100 * MiB)
    cost = entry_cost(b"k0", 64 * KiB, None, arena=False)
    store = TieredStore([CPUBackend(2 * cost), disk], write_policy="write-back")
    for i in range(4):
        store.put(f"k{i}".encode(), _block(i))
    assert store.flush(10)
    assert sorted(disk.iter_keys()) == [b"k0", b"k1"]  # only the evicted ones
    assert store.close()
    assert sorted(DiskBackend(str(tmp_path), 0, 100 * MiB).iter_keys()) == [
        b"k0", b"k1", b"k2", b"k3"
    ]  # fmt: skip


def test_no_cpu_budget_still_stores_below(tmp_path) -> None:
    store = TieredStore([CPUBackend(0), DiskBackend(str(tmp_path), 0, 10 * MiB)])
    assert store.put(b"k", _block(1))
    assert store.flush(10)
    assert _data(store.get(b"k")) == _data(_block(1))
    store.close()


def test_unknown_write_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="write-through"):
        TieredStore([CPUBackend(1)], write_policy="sometimes")


def test_lower_tier_blocks_are_served_in_wire_size_frames(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    store = TieredStore([CPUBackend(10 * MiB), disk], max_frame_size=64 * KiB)
    disk.put(b"k", _block(7, size=200 * KiB))
    got = store.get(b"k")
    assert [memoryview(f).nbytes for f in got.frames] == [64 * KiB] * 3 + [8 * KiB]
    assert got.tobytes() == _block(7, size=200 * KiB).tobytes()
    store.close()


def test_a_recovered_remote_shows_healthy_without_traffic(redis_server) -> None:
    from lmcached.testing import wait_until

    remote = RemoteBackend(
        make_connector(redis_server.url, timeout=0.5), backoff_initial=0.05, backoff_max=0.2
    )
    store = TieredStore([CPUBackend(MiB), remote])
    redis_server.stop()
    assert store.get(b"absent") is None
    assert store.stats()["remote"]["health"] == "down"
    redis_server.start()
    # No request touches the store: the idle write thread probes the remote by itself.
    wait_until(lambda: store.stats()["remote"]["health"] == "ok", 15, what="health ok")
    store.close()


def test_write_back_reaches_the_partitions_of_a_namespaced_cpu_tier(tmp_path) -> None:
    from lmcached.storage.namespaces import NamespacedBackend

    cost = entry_cost(b"team/m@0/any/0", 64 * KiB, None, arena=False)
    cpu = NamespacedBackend(4 * cost, {"team": 2 * cost})
    disk = DiskBackend(str(tmp_path), 0, 100 * MiB)
    store = TieredStore([cpu, disk], write_policy="write-back")
    for i in range(3):
        store.put(f"team/m@0/any/{i}".encode(), _block(i))
    assert store.flush(10)
    assert list(disk.iter_keys()) == [b"team/m@0/any/0"]  # evicted from the team's partition
    store.close()


def test_write_back_refuses_a_first_tier_without_eviction_reports(tmp_path) -> None:
    with pytest.raises(ValueError, match="write-back"):
        TieredStore([_StuckTier(), DiskBackend(str(tmp_path), 0, MiB)], write_policy="write-back")


@pytest.mark.parametrize("partitioned", [False, True])
def test_cached_prefix_stops_at_the_first_missing_key(partitioned: bool) -> None:
    from lmcached.storage.namespaces import NamespacedBackend

    cpu: StorageBackend = (
        NamespacedBackend(MiB, {"a": 256 * KiB}) if partitioned else CPUBackend(MiB)
    )
    store = TieredStore([cpu])
    try:
        keys = [f"a/k{i}".encode() for i in range(8)]
        assert store.cached_prefix(keys) == 0
        assert store.cached_prefix([]) == 0
        for k in keys[:3] + keys[4:]:
            assert store.put(k, _block(1, KiB))
        assert store.cached_prefix(keys) == 3  # k3 is missing: the later hits do not count
        assert store.cached_prefix(keys[4:]) == 4
        assert store.put(keys[3], _block(1, KiB))
        assert store.cached_prefix(keys) == 8
        assert store.cached_prefix([*keys, b"b/absent"]) == 8
    finally:
        store.close()


def _drive(steps):
    """Run a put_steps generator to its end; return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


@pytest.fixture
def arena_store(tmp_path):
    arena = Arena(str(tmp_path), "steps", 0, data_size=64 * MiB, descriptors=1024)
    cpu = CPUBackend(32 * MiB, arena=arena)
    store = TieredStore([cpu, DiskBackend(str(tmp_path / "disk"), 0, 64 * MiB)])
    yield store, cpu, arena
    store.close()


def _verified(data: bytes, checksum: int | None = None) -> Block:
    return Block.from_bytes(
        data, checksum=xxhash.xxh3_64_intdigest(data) if checksum is None else checksum
    )


def test_a_put_in_steps_publishes_its_block_only_once_whole_and_verified(arena_store) -> None:
    store, cpu, _ = arena_store
    data = bytes(range(256)) * (14 * KiB)  # 3.5 MiB: four pieces
    steps = store.put_steps(b"big", _verified(data))
    next(steps)  # one piece copied
    assert store.get_cached_many([b"big"]) == [None]
    assert _drive(steps) is True
    assert _data(store.get_cached_many([b"big"])[0]) == data
    assert cpu.usage().used_bytes == entry_cost(b"big", len(data), None, arena=True)


def test_a_put_in_steps_abandoned_or_refused_gives_its_slot_and_budget_back(arena_store) -> None:
    store, cpu, arena = arena_store
    data = b"x" * (3 * MiB)
    steps = store.put_steps(b"gone", _verified(data))
    next(steps)
    assert arena.slot_bytes > 0 and cpu.usage().used_bytes > 0
    steps.close()  # the worker stopped mid-put
    assert store.get_cached_many([b"gone"]) == [None]
    assert (arena.slot_bytes, cpu.usage().used_bytes) == (0, 0)
    _drive(store.put_steps(b"bad", _verified(data, checksum=1)))  # bytes not as announced
    assert store.get_cached_many([b"bad"]) == [None]
    assert (arena.slot_bytes, cpu.usage().used_bytes) == (0, 0)
    assert cpu.counters.extra["checksum_rejected"] == 1


def test_a_promotion_during_a_put_in_steps_does_not_outlive_it(arena_store) -> None:
    store, cpu, _ = arena_store
    old, new = b"o" * (2 * MiB), b"n" * (3 * MiB)
    steps = store.put_steps(b"k", _verified(new))
    next(steps)
    with store._ticket() as ticket:  # a get that read an older copy below, during the copy
        store._promote(b"k", _verified(old), 1, ticket)
    assert _data(store.get_cached_many([b"k"])[0]) == old  # no newer copy is whole yet
    assert _drive(steps) is True
    assert _data(store.get_cached_many([b"k"])[0]) == new
    assert cpu.usage().used_bytes == entry_cost(b"k", len(new), None, arena=True)
