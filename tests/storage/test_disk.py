"""The disk tier alone: persistence across instances, crash leftovers, budget, corruption."""

from __future__ import annotations

import os

import pytest

from lmcached.storage.base import Block
from lmcached.storage.blockfile import file_name
from lmcached.storage.disk import DiskBackend, check_disk

MiB = 1 << 20


def _block(i: int, size: int = 64 * 1024) -> Block:
    return Block.from_bytes(bytes([i % 251]) * size, {"i": i})


def _payload(block: Block | None) -> bytes | None:
    return None if block is None else block.tobytes()


def test_round_trip_and_remove_leave_no_block_file(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    assert disk.put(b"k1", _block(1))
    assert disk.contains(b"k1")
    got = disk.get(b"k1")
    assert _payload(got) == _payload(_block(1)) and got.meta == {"i": 1}
    assert disk.remove(b"k1") and not disk.remove(b"k1")
    assert disk.get(b"k1") is None
    assert [n for n in os.listdir(tmp_path / "0") if n.endswith(".blk")] == []
    disk.close()
    disk.close()


def test_a_new_instance_rebuilds_its_index_from_the_files(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 3, 10 * MiB)
    for i in range(5):
        disk.put(f"k{i}".encode(), _block(i))
    disk.close()
    again = DiskBackend(str(tmp_path), 3, 10 * MiB)
    assert sorted(again.iter_keys()) == [f"k{i}".encode() for i in range(5)]
    assert again.usage().entries == 5
    for i in range(5):
        assert _payload(again.get(f"k{i}".encode())) == _payload(_block(i))


def test_torn_temp_files_are_removed_at_start(tmp_path) -> None:
    DiskBackend(str(tmp_path), 0, MiB).close()
    torn = tmp_path / "0" / ".tmp-1234-1-0"
    torn.write_bytes(b"LMCB half a block")
    disk = DiskBackend(str(tmp_path), 0, MiB)
    assert not torn.exists()
    assert disk.stats()["torn_files_removed"] == 1


def test_budget_evicts_least_recently_used(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 3 * 70 * 1024)
    for i in range(3):
        assert disk.put(f"k{i}".encode(), _block(i))
    disk.get(b"k0")  # k1 is now the oldest
    assert disk.put(b"k3", _block(3))
    assert not disk.contains(b"k1") and disk.contains(b"k0") and disk.contains(b"k3")
    assert disk.stats()["evictions"] == 1
    assert not (tmp_path / "0" / file_name(b"k1")).exists()
    assert disk.usage().used_bytes <= disk.capacity
    # A block larger than the whole budget is refused, not stored.
    assert not disk.put(b"huge", _block(9, size=disk.capacity + 1))
    assert disk.stats()["rejected"] == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_files_are_misses_counted_and_deleted(tmp_path, damage: str) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    disk.put(b"bad", _block(7))
    path = tmp_path / "0" / file_name(b"bad")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x01
    else:
        del data[-100:]
    path.write_bytes(bytes(data))
    assert disk.get(b"bad") is None
    assert disk.stats()["checksum_failures"] == 1
    assert not path.exists() and not disk.contains(b"bad")


def test_truncated_file_is_dropped_at_start(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    disk.put(b"a", _block(1))
    disk.put(b"b", _block(2))
    path = tmp_path / "0" / file_name(b"b")
    os.truncate(path, path.stat().st_size - 10)
    again = DiskBackend(str(tmp_path), 0, 10 * MiB)
    assert list(again.iter_keys()) == [b"a"]
    assert again.stats()["checksum_failures"] == 1


def test_unwritable_folder_fails_writes_cleanly(tmp_path) -> None:
    # Works as root too: the shard folder is replaced by a file, so every write fails.
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    (tmp_path / "0" / ".lmcached-shard.json").unlink(missing_ok=True)
    (tmp_path / "0").rmdir()
    (tmp_path / "0").write_bytes(b"not a folder")
    assert not disk.put(b"k", _block(1))
    assert disk.stats()["write_errors"] == 1 and disk.usage().used_bytes == 0
    assert not disk.contains(b"k")


def _owner_mod(n: int):
    return lambda key: int.from_bytes(key[-1:], "little") % n


def test_changing_num_workers_moves_files_to_their_new_owner(tmp_path) -> None:
    keys = [f"key-{i}".encode() for i in range(12)]
    old = [
        DiskBackend(str(tmp_path), w, 10 * MiB, owner=_owner_mod(2), num_workers=2)
        for w in range(2)
    ]
    for k in keys:
        old[_owner_mod(2)(k)].put(k, _block(k[-1]))
    new = [
        DiskBackend(str(tmp_path), w, 10 * MiB, owner=_owner_mod(3), num_workers=3)
        for w in range(3)
    ]
    for k in keys:
        assert _payload(new[_owner_mod(3)(k)].get(k)) == _payload(_block(k[-1])), k
    assert sum(d.usage().entries for d in new) == len(keys)
    assert sum(d.stats()["files_moved_in"] for d in new) > 0


def test_check_reports_and_fixes(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    for k in (b"good", b"flip", b"cut"):
        disk.put(k, _block(len(k)))
    flip = tmp_path / "0" / file_name(b"flip")
    data = bytearray(flip.read_bytes())
    data[-1] ^= 0xFF
    flip.write_bytes(bytes(data))
    cut = tmp_path / "0" / file_name(b"cut")
    os.truncate(cut, 100)
    (tmp_path / "0" / ".tmp-1-1-1").write_bytes(b"torn")
    report = check_disk(str(tmp_path))
    assert report.files == 3 and report.ok == 1 and len(report.problems) == 3 and report.fixed == 0
    fixed = check_disk(str(tmp_path), fix=True)
    assert fixed.fixed == 3
    clean = check_disk(str(tmp_path))
    assert clean.problems == [] and clean.ok == 1


def test_disk_block_changed_after_verification_is_never_served(tmp_path) -> None:
    # A served disk block is a private copy of verified bytes: the file edited, truncated or
    # removed underneath afterwards changes nothing the caller holds (and cannot SIGBUS us).
    disk = DiskBackend(str(tmp_path), 0, 100 * MiB)
    want = _block(3, size=2 * MiB).tobytes()
    disk.put(b"big", _block(3, size=2 * MiB))
    got = disk.get(b"big")
    path = tmp_path / "0" / file_name(b"big")
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"\xff" * 16)
    assert got.tobytes() == want
    os.truncate(path, 100)
    assert got.tobytes() == want
    assert disk.get(b"big") is None  # the changed file itself fails verification


def test_large_corrupt_block_is_caught_through_the_mapping_too(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 100 * MiB)
    disk.put(b"big", _block(4, size=2 * MiB))
    path = tmp_path / "0" / file_name(b"big")
    with open(path, "r+b") as f:
        f.seek(MiB)
        byte = f.read(1)
        f.seek(MiB)
        f.write(bytes([byte[0] ^ 1]))
    assert disk.get(b"big") is None
    assert disk.stats()["checksum_failures"] == 1 and not path.exists()


def test_index_rebuild_past_its_time_budget_finishes_in_the_background(tmp_path) -> None:
    from lmcached.testing import wait_until

    disk = DiskBackend(str(tmp_path), 0, 100 * MiB)
    for i in range(600):
        disk.put(f"k{i}".encode(), _block(i, size=1024))
    disk.close()
    again = DiskBackend(str(tmp_path), 0, 100 * MiB, scan_sync_budget=0.0)
    assert again.stats()["index_complete"] == 0
    again.put(b"k5", _block(99, size=1024))  # a write during the scan wins over the old file
    wait_until(lambda: again.stats()["index_complete"] == 1, 10, what="the background index")
    assert again.usage().entries == 600
    assert again.get(b"k5").tobytes() == _block(99, size=1024).tobytes()
    again.close()
    again.close()
