"""Unit-level guards of the storage trust rules, over real tiers (folders, redis-server)."""

from __future__ import annotations

import os
import threading

import pytest

from lmcached.storage.base import Block
from lmcached.storage.blockfile import file_name
from lmcached.storage.cpu import CPUBackend
from lmcached.storage.disk import DiskBackend, check_disk
from lmcached.storage.integrity import IntegrityKeyError, load_integrity_key
from lmcached.storage.remote import RemoteBackend, make_connector
from lmcached.storage.tiered import Generations, LossLedger, TieredStore
from lmcached.storage.writequeue import WriteQueue

KiB = 1 << 10
MiB = 1 << 20


def _block(i: int, size: int = 4 * KiB, meta: dict | None = None) -> Block:
    return Block.from_bytes(bytes([i % 251]) * size, meta)


# --- one bad block fails alone ------------------------------------------------------------------


def test_disk_batch_with_a_key_too_long_for_the_format_writes_its_neighbours(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    items = [(b"a", _block(1)), (b"x" * 70_000, _block(2)), (b"b", _block(3))]
    assert disk.put_many(items) == [True, False, True]
    assert disk.get(b"a").tobytes() == _block(1).tobytes()
    assert disk.stats()["rejected_blocks"] == 1


def test_remote_batch_with_a_meta_too_large_for_the_format_writes_its_neighbours(
    tmp_path,
) -> None:
    remote = RemoteBackend(make_connector(f"fs://{tmp_path}", timeout=1.0))
    big = {"blob": b"m" * (1100 * KiB)}
    items = [(b"a", _block(1)), (b"b", _block(2, meta=big)), (b"c", _block(3))]
    assert remote.put_many(items) == [True, False, True]
    assert [b is not None for b in remote.get_many([b"a", b"b", b"c"])] == [True, False, True]
    assert remote.stats()["rejected_blocks"] == 1


def test_write_queue_reports_a_failed_write_to_the_origin_of_its_put() -> None:
    losses = LossLedger()
    done = threading.Event()

    def write(batch):
        done.set()
        return [k != b"bad" for k, _ in batch]

    q = WriteQueue("t", write, max_bytes=1 * MiB, on_loss=losses.record)
    try:
        assert q.offer(b"good", _block(1), b"client-a")
        assert q.offer(b"bad", _block(2), b"client-a")
        assert q.flush(10)
        assert not q.offer(b"huge", _block(3, size=2 * MiB), b"client-b")  # dropped: full
        assert losses.take(b"client-a").failed == 1
        assert losses.take(b"client-a").failed == 0  # reported once
        assert losses.take(b"client-b").dropped == 1
    finally:
        q.close(5)


def test_loss_ledger_forgets_the_oldest_origin_past_its_bound() -> None:
    ledger = LossLedger(max_origins=2)
    for origin in (b"a", b"b", b"c"):
        ledger.record(origin, "dropped")
    assert ledger.take(b"a").dropped == 0 and ledger.take(b"c").dropped == 1
    assert ledger.forgotten == 1


# --- deletes are final --------------------------------------------------------------------------


def test_generations_block_a_promotion_after_a_change_and_prune_when_idle() -> None:
    gens = Generations()
    ticket = gens.open()
    gens.stamp(b"k")
    assert gens.changed_since(ticket, b"k") and not gens.changed_since(ticket, b"other")
    later = gens.open()
    assert not gens.changed_since(later, b"k")
    gens.close(ticket)
    gens.close(later)
    assert len(gens) == 0  # no get in flight: nothing to remember


class _SlowDisk(DiskBackend):
    """A disk tier whose reads wait until the test lets them finish."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.reading = threading.Event()
        self.release = threading.Event()

    def get(self, key: bytes) -> Block | None:
        block = super().get(key)
        self.reading.set()
        self.release.wait(10)
        return block


def test_get_in_flight_does_not_promote_a_key_deleted_meanwhile(tmp_path) -> None:
    disk = _SlowDisk(str(tmp_path), 0, 10 * MiB)
    store = TieredStore([CPUBackend(1 * MiB), disk])
    try:
        disk.put(b"k", _block(1))  # on disk only
        got: list = []
        reader = threading.Thread(target=lambda: got.append(store.get(b"k")))
        reader.start()
        assert disk.reading.wait(10)  # the read has the bytes, not yet promoted
        deleter = threading.Thread(target=lambda: store.remove_many([b"k"]))
        deleter.start()
        deleter.join(10)
        disk.release.set()
        reader.join(10)
        assert store.get_cached_many([b"k"]) == [None]  # not resurrected into CPU
        assert store.get(b"k") is None
    finally:
        disk.release.set()
        store.close()


# --- verified bytes, quarantine -----------------------------------------------------------------


def test_disk_index_rebuild_quarantines_a_bad_meta_file_and_check_reports_it(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    disk.put(b"good", _block(1))
    disk.put(b"bad", _block(2, meta={"a": 1}))
    disk.close()
    path = tmp_path / "0" / file_name(b"bad")
    data = path.read_bytes()
    path.write_bytes(data.replace(b"\x81\xa1a\x01", b"\x81\xa1a\xc1"))  # reserved msgpack byte
    # the header checksum now fails, which is quarantined just the same; a valid-checksum bad
    # meta is covered by tests/adversarial/test_storage_integrity.py
    again = DiskBackend(str(tmp_path), 0, 10 * MiB)
    assert again.stats()["quarantined"] == 1 and again.get(b"good") is not None
    report = check_disk(str(tmp_path))
    assert any("quarantined" in p for _, p in report.problems)
    assert check_disk(str(tmp_path), fix=True).fixed == 1
    assert check_disk(str(tmp_path)).problems == []
    again.close()


def test_check_fix_reports_a_repair_it_cannot_make_instead_of_raising(tmp_path) -> None:
    disk = DiskBackend(str(tmp_path), 0, 10 * MiB)
    disk.put(b"k", _block(1))
    disk.close()
    (tmp_path / "5").write_text("a file where shard 5's folder should be")
    report = check_disk(str(tmp_path), owner=lambda key: 5, fix=True)  # the move must fail
    assert any("could not repair" in p for _, p in report.problems)
    assert (tmp_path / "0" / file_name(b"k")).exists()


# --- size caps on remote reads ------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["fs", "redis"])
def test_remote_value_over_the_cap_is_not_read_whole_and_is_a_miss(
    tmp_path, redis_server, scheme
) -> None:
    url = f"fs://{tmp_path}" if scheme == "fs" else redis_server.url
    writer = RemoteBackend(make_connector(url, timeout=5.0))
    writer.put_many([(b"big", _block(1, size=256 * KiB)), (b"small", _block(2))])
    reader = RemoteBackend(make_connector(url, timeout=5.0), max_value_bytes=64 * KiB)
    big, small = reader.get_many([b"big", b"small"])
    assert big is None and small is not None
    assert reader.stats()["oversized"] == 1
    assert writer.get(b"big") is None  # removed as foreign
    writer.close()
    reader.close()


# --- the integrity key file ---------------------------------------------------------------------


def test_integrity_key_loads_from_a_private_file_only(tmp_path) -> None:
    path = tmp_path / "key"
    path.write_text("0123456789abcdef0123456789abcdef\n")
    for mode in (0o600, 0o640):
        path.chmod(mode)
        assert len(load_integrity_key(str(path))) == 32
    for mode in (0o644, 0o400, 0o660):
        path.chmod(mode)
        with pytest.raises(IntegrityKeyError, match="mode"):
            load_integrity_key(str(path))
    path.chmod(0o600)
    path.write_text("short")
    with pytest.raises(IntegrityKeyError, match="at least 16"):
        load_integrity_key(str(path))
    with pytest.raises(IntegrityKeyError, match="cannot open"):
        load_integrity_key(str(tmp_path / "absent"))


def test_remote_with_a_secret_refuses_values_written_without_it(tmp_path) -> None:
    url = f"fs://{tmp_path}"
    secret = b"k" * 32
    keyed = RemoteBackend(make_connector(url, timeout=1.0), integrity_secret=secret)
    plain = RemoteBackend(make_connector(url, timeout=1.0))
    keyed.put(b"mine", _block(1))
    plain.put(b"forged", _block(2))
    assert keyed.get(b"mine").tobytes() == _block(1).tobytes()
    assert plain.get(b"mine").tobytes() == _block(1).tobytes()  # no secret: checksums only
    assert keyed.get(b"forged") is None
    assert keyed.stats()["mac_failures"] == 1


class _PutDuringEviction(DiskBackend):
    """Puts the first evicted key again while the eviction's unlink is due (another thread)."""

    def __init__(self, *a, key: bytes, **kw) -> None:
        self.victim_key = key
        self.put_done = threading.Event()
        self.putter: threading.Thread | None = None
        super().__init__(*a, **kw)

    def _delete_files(self, paths: list[str]) -> None:
        target = os.path.join(self.dir, file_name(self.victim_key))
        if self.putter is None and target in paths:

            def put_again() -> None:
                self.put(self.victim_key, _block(9))
                self.put_done.set()

            self.putter = threading.Thread(target=put_again)
            self.putter.start()
            # With the unlink outside the index lock, this put finishes first and loses its file.
            self.put_done.wait(2)
        super()._delete_files(paths)


def test_index_rebuild_eviction_never_deletes_a_file_written_meanwhile(tmp_path) -> None:
    big = DiskBackend(str(tmp_path), 0, 10 * MiB)
    for i in range(8):
        big.put(f"k{i}".encode(), _block(i, size=64 * KiB))
    big.close()
    # A smaller budget: the rebuild evicts the oldest files, k0 first.
    disk = _PutDuringEviction(str(tmp_path), 0, 5 * 70 * KiB, key=b"k0")
    assert disk.putter is not None
    disk.putter.join(10)
    got = disk.get(b"k0")
    assert got is not None and got.tobytes() == _block(9).tobytes()
    disk.close()
