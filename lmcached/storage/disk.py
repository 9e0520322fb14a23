"""The local-disk tier: one self-describing file per block under ``<local_disk>/<worker_id>/``.

The index (key -> file size) lives in memory and is rebuilt at start by scanning the headers of
the files, so the tier survives a clean stop and a ``kill -9`` alike: a block is visible only
once its file was renamed into place, and leftover temporary files are removed at start.

When ``num_workers`` changed since the last run, each worker pulls the files it now owns out of
the other shard folders before it scans its own (see :meth:`DiskBackend._pull_owned_files`).

Thread safety: the worker's I/O threads read, the write-through thread writes and the request
loop removes, all at once. The index is guarded by one lock; reads and writes of file contents
happen outside it, but an unlink of a key's file happens under it, together with the index
change, so that it can never remove a newer file of the same key written meanwhile.

A file that cannot be trusted is never fatal: at index rebuild, a file whose header is corrupt
or whose metadata cannot be decoded is moved aside into ``<local_disk>/<worker_id>/quarantine/``
(counted as ``quarantined``, listed by ``lmcached check``), so one bad file costs one miss,
never a crash loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog

from lmcached.storage.base import Block, StorageBackend, TierStats, Usage
from lmcached.storage.blockfile import (
    BLOCK_SUFFIX,
    file_name,
    fsync_dir,
    is_temp_name,
    read_block_file,
    read_block_header,
    write_block_file,
)
from lmcached.storage.blockformat import BlockFormatError, encode_header
from lmcached.storage.eviction import EvictionPolicy, make_policy

log = structlog.get_logger("lmcached.storage.disk")

SHARD_MARKER = ".lmcached-shard.json"
# How often a worker pulling its files after a num_workers change logs how far it got.
RESHARD_PROGRESS_INTERVAL_S = 5.0
QUARANTINE_DIR = "quarantine"
Owner = Callable[[bytes], int]


def shard_dirs(root: str) -> list[tuple[int, str]]:
    """Return (worker id, path) of every shard folder under ``root``, by id."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    out = [(int(e.name), e.path) for e in entries if e.name.isdigit() and e.is_dir()]
    return sorted(out)


class DiskBackend(StorageBackend):
    """Store blocks as files in one shard folder, under a byte budget with eviction."""

    name = "disk"

    def __init__(
        self,
        root: str,
        worker_id: int,
        capacity_bytes: int,
        *,
        policy: str | EvictionPolicy = "lru",
        fsync: bool = False,
        drop_cache: bool = False,
        mmap_reads: bool = True,
        owner: Owner | None = None,
        num_workers: int | None = None,
        scan_sync_budget: float = 5.0,
    ) -> None:
        self.root = root
        self.worker_id = worker_id
        self.dir = os.path.join(root, str(worker_id))
        self.capacity = capacity_bytes
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.fsync = fsync
        self.drop_cache = drop_cache
        self.mmap_reads = mmap_reads
        self._owner = owner
        self._num_workers = num_workers
        self.counters = TierStats()
        for name in (
            "checksum_failures",
            "write_errors",
            "torn_files_removed",
            "files_moved_in",
            "unsupported_version",
            "quarantined",
            "rejected_blocks",
        ):
            self.counters.extra[name] = 0
        self._index: dict[bytes, int] = {}  # key -> file size (header + payload)
        self._used = 0
        self._lock = threading.Lock()
        self._closed = False
        self.scan_sync_budget = scan_sync_budget
        self._index_complete = False
        self._scan_thread: threading.Thread | None = None
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        if owner is not None and num_workers is not None:
            self._pull_owned_files()
        self._scan()

    # --- start-up ---------------------------------------------------------------------------

    def _owns(self, key: bytes) -> bool:
        return self._owner is None or self._owner(key) == self.worker_id

    def _read_marker(self) -> dict[str, object]:
        try:
            with open(os.path.join(self.dir, SHARD_MARKER)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_marker(self) -> None:
        path = os.path.join(self.dir, SHARD_MARKER)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"worker_id": self.worker_id, "num_workers": self._num_workers}, f)
        os.replace(tmp, path)
        fsync_dir(self.dir)

    def _pull_owned_files(self) -> None:
        """Move files this worker now owns out of other shard folders (num_workers changed).

        Each file has exactly one owner, so workers pulling at the same time never contend for
        a file. The marker is written last: a worker killed halfway pulls again at its next start.
        """
        if self._read_marker().get("num_workers") == self._num_workers:
            return
        moved = scanned = 0
        sources: set[str] = set()
        others = [(wid, path) for wid, path in shard_dirs(self.root) if wid != self.worker_id]
        if others:
            # A large tier takes minutes to reshard: say so at once, then every few seconds,
            # so a slow start does not look like a hang.
            log.info("disk shard resharding", worker_id=self.worker_id, shards=len(others))
        reported_at = time.monotonic()
        for _wid, path in others:
            for entry in os.scandir(path):
                if not entry.name.endswith(BLOCK_SUFFIX):
                    continue
                scanned += 1
                if time.monotonic() - reported_at >= RESHARD_PROGRESS_INTERVAL_S:
                    reported_at = time.monotonic()
                    log.info(
                        "disk shard resharding progress",
                        worker_id=self.worker_id,
                        files_scanned=scanned,
                        files_moved_in=moved,
                    )
                try:
                    header, _ = read_block_header(entry.path)
                except (OSError, BlockFormatError):
                    continue  # its own shard's scan, or `lmcached check`, deals with it
                if self._owns(header.key):
                    try:
                        os.replace(entry.path, os.path.join(self.dir, file_name(header.key)))
                        moved += 1
                        sources.add(path)
                    except FileNotFoundError:
                        continue
        if moved:
            # A rename is durable only once both folders are synced: without it a power loss
            # could leave a moved file in neither folder, or the marker ahead of the moves.
            fsync_dir(self.dir)
            for path in sorted(sources):
                fsync_dir(path)
        self.counters.extra["files_moved_in"] += moved
        if moved:
            log.info("disk shard resharded", worker_id=self.worker_id, files_moved_in=moved)
        self._write_marker()

    def _scan(self) -> None:
        """Rebuild the index from the files' headers; remove torn and corrupt files.

        Files are indexed oldest first (so LRU order after a restart follows write time). The
        scan runs inline for at most ``scan_sync_budget`` seconds, so a worker with a huge
        disk still starts in time; the rest is indexed by a background thread, and until it is
        done those blocks are misses (stats: ``index_complete``).
        """
        entries: list[tuple[float, os.DirEntry[str]]] = []
        for entry in os.scandir(self.dir):
            if is_temp_name(entry.name):
                self._unlink(entry.path)
                self.counters.extra["torn_files_removed"] += 1
            elif entry.name.endswith(BLOCK_SUFFIX):
                try:
                    entries.append((entry.stat().st_mtime, entry))
                except OSError:
                    continue
        entries.sort(key=lambda t: t[0])
        todo = [e for _, e in entries]
        done = self._index_entries(todo, time.monotonic() + self.scan_sync_budget)
        if done < len(todo):
            log.info(
                "disk index continues in the background",
                worker_id=self.worker_id,
                indexed=done,
                remaining=len(todo) - done,
            )
            self._scan_thread = threading.Thread(
                target=self._index_entries,
                args=(todo[done:], None),
                name=f"disk-scan-{self.worker_id}",
                daemon=True,
            )
            self._scan_thread.start()
        else:
            self._index_complete = True
            if todo:
                log.info(
                    "disk index rebuilt",
                    worker_id=self.worker_id,
                    entries=len(self._index),
                    bytes=self._used,
                )

    def _index_entries(self, entries: list[os.DirEntry[str]], deadline: float | None) -> int:
        """Index ``entries`` in chunks; stop at ``deadline``; return how many were handled."""
        handled = 0
        chunk = 256
        while handled < len(entries) and not self._closed:
            if deadline is not None and time.monotonic() >= deadline:
                return handled
            found: list[tuple[bytes, int]] = []
            for entry in entries[handled : handled + chunk]:
                parsed = self._read_header(entry)
                if parsed is not None:
                    found.append(parsed)
            handled += min(chunk, len(entries) - handled)
            with self._lock:
                for key, size in found:
                    if key in self._index:
                        continue  # written again since the start: the newer entry wins
                    self._index[key] = size
                    self._used += size
                    self.policy.on_insert(key, size)
                # Under the lock: a put of a victim's key right after must not lose its new file.
                self._delete_files(self._make_room_locked(0))
        if deadline is None and not self._closed:
            self._index_complete = True
            log.info("disk index rebuilt", worker_id=self.worker_id, entries=len(self._index))
        return handled

    def _read_header(self, entry: os.DirEntry[str]) -> tuple[bytes, int] | None:
        """Return (key, file size) of a block file this worker owns, or None (and set aside)."""
        try:
            header, size = read_block_header(entry.path)
            if entry.name != file_name(header.key):
                raise BlockFormatError("bad_header", "file name does not match its key")
        except BlockFormatError as exc:
            if exc.kind == "unsupported_version":
                self.counters.extra["unsupported_version"] += 1
                return None
            self._quarantine(entry.path, exc)
            return None
        except OSError:
            return None
        if not self._owns(header.key):
            return None  # its owner pulls it at its own start
        return header.key, size

    def _quarantine(self, path: str, exc: BlockFormatError) -> None:
        """Move a file that failed verification aside (never fatal; `lmcached check` lists it)."""
        log.warning("disk block moved to quarantine", path=path, error=str(exc))
        self.counters.extra["checksum_failures"] += 1
        try:
            quarantine_file(self.dir, path)
            self.counters.extra["quarantined"] += 1
        except OSError as move_exc:
            log.warning("quarantine failed; removing", path=path, error=str(move_exc))
            self._unlink(path)

    # --- StorageBackend ---------------------------------------------------------------------

    def _path(self, key: bytes) -> str:
        return os.path.join(self.dir, file_name(key))

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._index

    def get(self, key: bytes) -> Block | None:
        with self._lock:
            present = key in self._index
        if not present:
            self.counters.misses += 1
            return None
        try:
            block = read_block_file(
                self._path(key), key, drop_cache=self.drop_cache, use_mmap=self.mmap_reads
            )
        except FileNotFoundError:
            self._forget(key)
            self.counters.misses += 1
            return None
        except BlockFormatError as exc:
            self.counters.misses += 1
            if exc.kind == "unsupported_version":
                self.counters.extra["unsupported_version"] += 1
                return None
            log.warning("disk block failed verification", key=key, error=str(exc))
            self.counters.extra["checksum_failures"] += 1
            self.remove(key)
            return None
        except OSError as exc:
            log.warning("disk read failed", key=key, error=str(exc))
            self.counters.errors += 1
            self.counters.misses += 1
            return None
        with self._lock:
            if key in self._index:
                self.policy.on_access(key)
        self.counters.hits += 1
        self.counters.bytes_read += block.nbytes
        return block

    def put(self, key: bytes, block: Block) -> bool:
        try:
            size = len(encode_header(key, block)) + block.nbytes
        except (ValueError, TypeError) as exc:
            # One block the format cannot hold (key or meta too large): it fails alone, so the
            # rest of its write batch is still written.
            self.counters.rejected += 1
            self.counters.extra["rejected_blocks"] += 1
            if self.counters.extra["rejected_blocks"] == 1:
                log.warning("disk tier rejected a block", key=key[:80], error=str(exc))
            return False
        if size > self.capacity:
            self.counters.rejected += 1
            return False
        # Reserve the room before writing, so concurrent writers never overshoot the budget.
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old
                self.policy.on_remove(key)
            self._delete_files(self._make_room_locked(size))
            self._used += size
        try:
            _, written = write_block_file(
                self.dir, key, block, fsync=self.fsync, drop_cache=self.drop_cache
            )
        except OSError as exc:
            with self._lock:
                self._used -= size
            if old is not None:
                self._unlink(self._path(key))  # the old file no longer matches the index
            self.counters.errors += 1
            self.counters.extra["write_errors"] += 1
            log.warning("disk write failed", key=key, dir=self.dir, error=str(exc))
            return False
        with self._lock:
            prev = self._index.get(key)
            if prev is not None:  # indexed meanwhile (by the background scan): replace it
                self._used -= prev
                self.policy.on_remove(key)
            self._used += written - size
            self._index[key] = written
            self.policy.on_insert(key, written)
        self.counters.puts += 1
        self.counters.bytes_stored += block.nbytes
        return True

    def _make_room_locked(self, nbytes: int) -> list[str]:
        victims = []
        while self._used + nbytes > self.capacity:
            key = self.policy.victim()
            if key is None:
                break
            self.policy.on_remove(key)
            self._used -= self._index.pop(key, 0)
            victims.append(self._path(key))
            self.counters.evictions += 1
        return victims

    def _delete_files(self, paths: list[str]) -> None:
        for p in paths:
            self._unlink(p)

    @staticmethod
    def _unlink(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _forget(self, key: bytes, *, unlink: bool = False) -> bool:
        """Drop ``key`` from the index, and with ``unlink`` its file; return whether it was there.

        The file goes under the same lock, so a put of the key that follows cannot lose its new
        file to this unlink."""
        with self._lock:
            size = self._index.pop(key, None)
            if size is None:
                return False
            self._used -= size
            self.policy.on_remove(key)
            if unlink:
                self._unlink(self._path(key))
            return True

    def remove(self, key: bytes) -> bool:
        return self._forget(key, unlink=True)

    def iter_keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index))

    def usage(self) -> Usage:
        with self._lock:
            return Usage(
                used_bytes=self._used, capacity_bytes=self.capacity, entries=len(self._index)
            )

    def stats(self) -> dict[str, int]:
        return {**self.usage_stats(self.counters), "index_complete": int(self._index_complete)}

    def close(self) -> None:
        # Files are the state; nothing is buffered, so closing only drops the index.
        if self._closed:
            return
        self._closed = True
        if self._scan_thread is not None:
            self._scan_thread.join(timeout=10)  # it stops at its next chunk
        with self._lock:
            self._index.clear()


@dataclass
class CheckReport:
    """What `lmcached check` found in one disk root, and what it repaired."""

    files: int = 0
    bytes: int = 0
    ok: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, what is wrong)
    fixed: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "ok": self.ok,
            "problems": [{"path": p, "problem": w} for p, w in self.problems],
            "fixed": self.fixed,
        }


def quarantine_file(shard_dir: str, path: str) -> str:
    """Move ``path`` into ``<shard_dir>/quarantine/`` (never overwriting); return the new path."""
    qdir = os.path.join(shard_dir, QUARANTINE_DIR)
    os.makedirs(qdir, mode=0o700, exist_ok=True)
    dest = os.path.join(qdir, f"{os.path.basename(path)}.{time.time_ns()}")
    os.replace(path, dest)
    return dest


def check_disk(
    root: str,
    *,
    owner: Owner | None = None,
    fix: bool = False,
    verify_payload: bool = True,
    progress: Callable[[CheckReport], None] | None = None,
) -> CheckReport:
    """Reconcile every shard folder under ``root`` with its files' headers.

    Finds torn temporary files, files whose header, metadata or payload fails verification,
    files whose name does not match the key in their header, files a worker moved to
    quarantine, and (given ``owner``) files in the wrong shard. With ``fix``, removes the broken
    and quarantined ones and moves misplaced ones to their owner's folder. Never raises for what
    it finds: a file it cannot read or repair is reported as a problem. ``progress`` is called
    with the report so far before each file (a large tier takes minutes).
    """
    report = CheckReport()
    for wid, path in shard_dirs(root):
        _check_quarantine(os.path.join(path, QUARANTINE_DIR), report, fix)
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            if progress is not None:
                progress(report)
            try:
                _check_entry(root, wid, entry, report, owner, fix, verify_payload)
            except OSError as exc:  # a repair that failed (permissions, a full disk)
                report.problems.append((entry.path, f"could not repair: {exc}"))
    return report


def _check_quarantine(qdir: str, report: CheckReport, fix: bool) -> None:
    try:
        entries = sorted(os.scandir(qdir), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        report.problems.append((entry.path, "quarantined: failed verification at index rebuild"))
        if fix:
            try:
                os.unlink(entry.path)
                report.fixed += 1
            except OSError as exc:
                report.problems.append((entry.path, f"could not remove: {exc}"))


def _check_entry(
    root: str,
    wid: int,
    entry: os.DirEntry[str],
    report: CheckReport,
    owner: Owner | None,
    fix: bool,
    verify_payload: bool,
) -> None:
    if is_temp_name(entry.name):
        report.problems.append((entry.path, "torn temporary file"))
        if fix:
            DiskBackend._unlink(entry.path)
            report.fixed += 1
        return
    if not entry.name.endswith(BLOCK_SUFFIX):
        return
    report.files += 1
    try:
        header, size = read_block_header(entry.path)
        report.bytes += size
        if entry.name != file_name(header.key):
            raise BlockFormatError("bad_header", "file name does not match its key")
        if verify_payload:
            read_block_file(entry.path, header.key)
    except BlockFormatError as exc:
        if exc.kind == "unsupported_version":
            report.problems.append((entry.path, f"skipped: {exc}"))
            return
        report.problems.append((entry.path, f"{exc.kind}: {exc}"))
        if fix:
            DiskBackend._unlink(entry.path)
            report.fixed += 1
        return
    except OSError as exc:
        report.problems.append((entry.path, f"unreadable: {exc}"))
        return
    new_owner = owner(header.key) if owner is not None else wid
    if new_owner != wid:
        report.problems.append((entry.path, f"belongs to shard {new_owner}"))
        if fix:
            dest = os.path.join(root, str(new_owner))
            os.makedirs(dest, mode=0o700, exist_ok=True)
            os.replace(entry.path, os.path.join(dest, entry.name))
            fsync_dir(dest)
            report.fixed += 1
        return
    report.ok += 1
