"""Stored bytes under attack and under an unlucky operator: real daemons, real files, real Redis.

Each test is named after the broken promise it guards: bytes served are verified bytes, one bad
block fails alone, flush() is honest, bad values are counted misses (never crash loops), forged
remote values are misses, and deletes are final.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
import xxhash

from lmcached.errors import LMCachedRequestError
from lmcached.storage.base import Block
from lmcached.storage.blockfile import file_name
from lmcached.storage.blockformat import encode_block
from lmcached.testing import DaemonProcess

KiB = 1 << 10
MiB = 1 << 20


def _value(i: int, size: int = 64 * KiB) -> bytes:
    return bytes([i % 251]) * (size - 8) + i.to_bytes(8, "little")


# A block larger than a 1 MiB write queue: the queue drops it even when empty.
_QUEUE_BUSTER = 2 * MiB


def _keys(n: int, prefix: str = "ns/m@0/any/") -> list[bytes]:
    return [f"{prefix}{i:08x}".encode() for i in range(n)]


def _disk_daemon(
    tmp_path: Path, max_local_disk_size: str = "64MiB", **settings: Any
) -> DaemonProcess:
    """One worker with a disk tier in ``tmp_path/disk``."""
    return DaemonProcess(
        tmp_path / "d",
        num_workers=1,
        local_disk=str(tmp_path / "disk"),
        max_local_disk_size=max_local_disk_size,
        **settings,
    )


def _worker_totals(client) -> dict:
    return client.stats()["totals"]


def _with_raw_meta(stored: bytes, meta_bytes: bytes) -> bytes:
    """Return a stored block whose metadata field is ``meta_bytes``, with valid checksums.

    What a buggy or hostile writer can produce: every checksum matches, the metadata is junk.
    """
    (magic, version, codec, dtype, ndim, header_len, key_len, flags, _meta_len, plen, csum) = (
        struct.unpack_from("<4sBBBBIHHIQQ", stored)
    )
    key_at = 36 + 8 * ndim
    shape_and_key = stored[36 : key_at + key_len]
    new_len = 36 + 8 * ndim + key_len + len(meta_bytes) + 8
    head = (
        struct.pack(
            "<4sBBBBIHHIQQ",
            magic,
            version,
            codec,
            dtype,
            ndim,
            new_len,
            key_len,
            flags,
            len(meta_bytes),
            plen,
            csum,
        )
        + shape_and_key
        + meta_bytes
    )
    return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head)) + stored[header_len:]


def _cli(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcached", *args, "--config", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=daemon.env,
    )


# --- verified bytes only ------------------------------------------------------------------------


def test_disk_block_changed_under_the_daemon_is_never_served_and_never_kills_it(
    tmp_path: Path,
) -> None:
    key = _keys(1)[0]
    want = _value(7, 2 * MiB)  # large enough for the old zero-copy mapped read
    daemon = _disk_daemon(tmp_path)
    with daemon:
        with daemon.client() as c:
            c.put([key], [want])
            c.flush()
        daemon.stop()
        daemon.start()  # an empty CPU tier: the next get reads the file and keeps the block
        path = tmp_path / "disk" / "0" / file_name(key)
        with daemon.client() as c:
            assert bytes(c.get([key])[0]) == want
            worker = daemon.worker_pids()
            with open(path, "r+b") as f:  # a byte flipped in place, after verification
                f.seek(MiB)
                f.write(bytes([want[MiB - 100] ^ 0xFF]))
            assert bytes(c.get([key])[0]) == want
            os.truncate(path, 4096)  # a truncation under a mapping was a SIGBUS
            assert bytes(c.get([key])[0]) == want
            assert daemon.worker_pids() == worker


# --- one bad block fails alone ------------------------------------------------------------------


def test_key_too_long_for_the_disk_format_fails_alone_in_its_write_batch(tmp_path: Path) -> None:
    keys = _keys(20)
    long_key = b"ns/m@0/any/" + b"x" * 66_000  # the wire allows it here, the format does not
    daemon = _disk_daemon(tmp_path, max_key_length=70_000)
    with daemon:
        with daemon.client() as c:
            c.put([*keys[:10], long_key, *keys[10:]], [_value(i) for i in range(21)])
            report = c.flush()
            rejected = _worker_totals(c)["disk"].get("rejected_blocks")
        daemon.stop()
        daemon.start()  # CPU is empty: only what reached the disk is served
        with daemon.client() as c:
            got = c.get(keys)
            assert [bytes(v) if v is not None else None for v in got] == [
                _value(i) for i in (*range(10), *range(11, 21))
            ]
        # The bad block is reported: counted by the tier, and by the flush of its client.
        assert rejected == 1
        assert report.failed == 1 and report.dropped == 0


def test_oversized_meta_is_refused_at_the_wire_and_the_daemon_keeps_serving(
    tmp_path: Path,
) -> None:
    keys = _keys(2)
    huge_meta = {"blob": b"m" * (1200 * KiB)}
    with DaemonProcess(tmp_path / "d", num_workers=1) as daemon, daemon.client() as c:
        with pytest.raises(LMCachedRequestError, match="max_meta_bytes"):
            c.put(keys, [_value(0), _value(1)], metas=[None, huge_meta])
        assert c.get(keys) == [None, None]  # nothing of the refused request was stored
        c.put(keys, [_value(0), _value(1)], metas=[None, {"dtype": "float16"}])
        assert bytes(c.get([keys[1]])[0]) == _value(1)


# --- an honest flush ----------------------------------------------------------------------------


def test_flush_reports_the_writes_its_queue_dropped(tmp_path: Path) -> None:
    keys = _keys(64)
    daemon = _disk_daemon(
        tmp_path,
        max_local_disk_size="256MiB",
        write_queue_size="1MiB",  # room for a few 256 KiB blocks only
    )
    with daemon:
        with daemon.client() as c:
            # The first block is larger than the whole queue: dropped however fast the disk
            # drains the rest (a fast disk kept up with every 256 KiB block, now and then).
            c.put(
                keys, [_value(i, _QUEUE_BUSTER if i == 0 else 256 * KiB) for i in range(len(keys))]
            )
            report = c.flush()
            assert report.dropped > 0 and not report.complete
            assert c.flush().complete  # reported once, to the client that put them
        daemon.kill9()  # a flushed block must be a block on disk: the rest were reported
        daemon.start()
        with daemon.client() as c:
            on_disk = sum(v is not None for v in c.get(keys))
        assert on_disk == len(keys) - report.lost


def test_flush_after_the_worker_holding_its_puts_was_killed_is_not_complete(
    tmp_path: Path,
) -> None:
    # kill -9 of a worker between a put and the flush: the restarted worker has no record of
    # its predecessor's pending writes, so its own counts would call the flush complete while
    # most of the blocks never reached disk (measured: 20-38 of 48 1 MiB blocks lost).
    import psutil

    from lmcached.testing import wait_until

    keys = _keys(48)
    daemon = DaemonProcess(
        tmp_path / "d",
        num_workers=1,
        local_disk=str(tmp_path / "disk"),
        max_local_disk_size="256MiB",
    )
    with daemon:
        with daemon.client(timeout=30) as c:
            c.put(keys[:4], [_value(i) for i in range(4)])
            assert c.flush().complete  # the same worker process: nothing to report
            old = daemon.worker_pids()[0]
            c.put(keys, [_value(i, MiB) for i in range(len(keys))])
            os.kill(old, 9)
            wait_until(lambda: not psutil.pid_exists(old) or daemon.worker_pids() != [old], 30)
            wait_until(lambda: len(daemon.worker_pids()) == 1, 30, what="the worker back")
            report = c.flush()
            assert not report.complete
            assert report.unconfirmed == len(keys)
            assert c.flush().complete  # reported once
            c.put(keys, [_value(i, MiB) for i in range(len(keys))])
            assert c.flush().complete
        daemon.kill9()  # what the last flush called complete is on disk
        daemon.start()
        with daemon.client(timeout=30) as c:
            got = c.get(keys)
            assert all(v is not None and bytes(v) == _value(i, MiB) for i, v in enumerate(got))
            del got


def test_asyncio_client_flush_reports_drops_of_puts_made_through_any_connection(
    tmp_path: Path,
) -> None:
    import asyncio

    from lmcached.aio import Client as AsyncClient

    keys = _keys(64)
    daemon = _disk_daemon(tmp_path, max_local_disk_size="256MiB", write_queue_size="1MiB")

    async def put_then_flush():
        async with AsyncClient.from_config(daemon.config_path, max_concurrency=4) as c:
            # Concurrent puts go through several pooled connections. Each put's first block is
            # larger than the whole queue, so each put has a drop, however fast the disk drains
            # the rest (a fast disk kept up with every 256 KiB block, now and then).
            await asyncio.gather(
                *(
                    c.put(
                        keys[i : i + 8],
                        [
                            _value(j, _QUEUE_BUSTER if j == i else 256 * KiB)
                            for j in range(i, i + 8)
                        ],
                    )
                    for i in range(0, len(keys), 8)
                )
            )
            return await c.flush()

    with daemon:
        report = asyncio.run(put_then_flush())
        assert report.dropped > 0
        assert report.dropped >= len(keys) // 8  # one per put, whichever connection it took
        daemon.kill9()
        daemon.start()
        with daemon.client() as c:
            on_disk = sum(v is not None for v in c.get(keys))
        assert on_disk == len(keys) - report.lost


# --- quarantine, not crash loops ----------------------------------------------------------------


@pytest.mark.parametrize("meta_bytes", [b"\x07", b"\xc1"], ids=["non-map", "undecodable"])
def test_remote_value_with_a_bad_meta_is_a_counted_miss_and_its_batch_is_served(
    tmp_path: Path, redis_server, meta_bytes: bytes
) -> None:
    keys = _keys(3)
    daemon = DaemonProcess(
        tmp_path / "d", num_workers=1, remote_url=redis_server.url, remote_timeout=10
    )
    with daemon:
        with daemon.client() as c:
            c.put(keys, [_value(i) for i in range(3)])
            assert c.flush().complete
        raw = redis.Redis(port=redis_server.port)
        bad = b"lmcached:" + keys[1]
        raw.set(bad, _with_raw_meta(raw.get(bad), meta_bytes))
        daemon.stop()  # an empty CPU tier: the batch below is read from Redis
        daemon.start()
        with daemon.client() as c:
            got = c.get(keys)
            assert [None if v is None else bytes(v) for v in got] == [_value(0), None, _value(2)]
            assert _worker_totals(c)["remote"]["bad_meta"] == 1
        assert raw.exists(bad) == 0  # removed, so the next reader does not pay again
        raw.close()


def test_disk_file_with_a_bad_meta_is_quarantined_not_a_crash_loop(tmp_path: Path) -> None:
    keys = _keys(3)
    daemon = _disk_daemon(tmp_path)
    with daemon:
        with daemon.client() as c:
            c.put(keys, [_value(i) for i in range(3)])
            assert c.flush().complete
        daemon.stop()
        path = tmp_path / "disk" / "0" / file_name(keys[1])
        path.write_bytes(_with_raw_meta(path.read_bytes(), b"\xc1"))
        daemon.start(timeout=60)  # the index rebuild moves the file aside and carries on
        worker = daemon.worker_pids()
        with daemon.client() as c:
            got = c.get(keys)
            assert [None if v is None else bytes(v) for v in got] == [_value(0), None, _value(2)]
            assert _worker_totals(c)["disk"]["quarantined"] == 1
        assert daemon.worker_pids() == worker  # no restart happened
        assert not path.exists()
        daemon.stop()
        check = _cli(daemon, "check")
        assert check.returncode == 1 and "quarantined" in check.stdout, check.stdout
        fixed = _cli(daemon, "check", "--fix")
        assert fixed.returncode == 0 and "Traceback" not in fixed.stderr, fixed.stderr
        assert _cli(daemon, "check").returncode == 0


def test_check_fix_handles_a_bad_meta_file_without_raising(tmp_path: Path) -> None:
    from lmcached.storage.disk import DiskBackend

    daemon = _disk_daemon(tmp_path)
    try:
        disk = DiskBackend(str(tmp_path / "disk"), 0, 64 * MiB)
        disk.put(b"good", Block.from_bytes(_value(1)))
        disk.put(b"bad", Block.from_bytes(_value(2)))
        disk.close()
        path = tmp_path / "disk" / "0" / file_name(b"bad")
        path.write_bytes(_with_raw_meta(path.read_bytes(), b"\xc1"))
        check = _cli(daemon, "check")
        assert check.returncode == 1 and "bad_meta" in check.stdout, check.stdout + check.stderr
        fixed = _cli(daemon, "check", "--fix")
        assert fixed.returncode == 0 and "Traceback" not in fixed.stderr, fixed.stderr
        assert not path.exists() and (tmp_path / "disk" / "0" / file_name(b"good")).exists()
    finally:
        daemon.close()


# --- keyed integrity ----------------------------------------------------------------------------


def _secret_file(tmp_path: Path, mode: int = 0o600) -> Path:
    path = tmp_path / "integrity.key"
    path.write_bytes(os.urandom(32).hex().encode())
    path.chmod(mode)
    return path


def test_forged_or_copied_remote_value_is_a_counted_miss_with_an_integrity_key(
    tmp_path: Path, redis_server
) -> None:
    genuine, forged, copied = _keys(3)
    daemon = DaemonProcess(
        tmp_path / "d",
        num_workers=1,
        remote_url=redis_server.url,
        remote_timeout=10,
        integrity_key_file=str(_secret_file(tmp_path)),
    )
    with daemon:
        with daemon.client() as c:
            c.put([genuine], [_value(1)])
            assert c.flush().complete
        raw = redis.Redis(port=redis_server.port)
        # A writer to the shared Redis without the secret: a well-formed, checksummed block ...
        evil = Block.from_bytes(_value(666))
        prefixed = b"lmcached:" + forged
        raw.set(prefixed, b"".join(bytes(p) for p in encode_block(prefixed, evil)))
        # ... and the genuine value under another key, its header's key rewritten to match.
        value = bytearray(raw.get(b"lmcached:" + genuine))
        at = value.index(b"lmcached:" + genuine)
        value[at : at + len(b"lmcached:" + copied)] = b"lmcached:" + copied
        header_len = struct.unpack_from("<I", value, 8)[0]
        struct.pack_into(
            "<Q", value, header_len - 8, xxhash.xxh3_64_intdigest(bytes(value[: header_len - 8]))
        )
        raw.set(b"lmcached:" + copied, bytes(value))
        daemon.stop()
        daemon.start()
        with daemon.client() as c:
            got = c.get([genuine, forged, copied])
            assert bytes(got[0]) == _value(1) and got[1:] == [None, None]
            assert _worker_totals(c)["remote"]["mac_failures"] == 2
        raw.close()


@pytest.mark.parametrize("mode", [0o644, 0o660, 0o604])
def test_integrity_key_file_readable_by_others_is_refused_in_one_line(
    tmp_path: Path, mode: int
) -> None:
    daemon = DaemonProcess(
        tmp_path / "d",
        remote_url="redis://127.0.0.1:1/0",
        integrity_key_file=str(_secret_file(tmp_path, mode)),
    )
    try:
        out = _cli(daemon, "config", "check")
        assert out.returncode != 0
        message = (out.stderr + out.stdout).strip()
        assert "integrity_key_file" in message and oct(mode)[2:] in message
        assert len(message.splitlines()) == 1 and "Traceback" not in message
        assert stat.S_IMODE(Path(daemon.cfg.integrity_key_file).stat().st_mode) == mode
    finally:
        daemon.close()


# --- deletes are final --------------------------------------------------------------------------


def test_delete_during_in_flight_disk_gets_never_resurrects_the_key(tmp_path: Path) -> None:
    key = _keys(1)[0]
    fillers = _keys(3, prefix="ns/m@0/fill/")
    size = 4 * MiB
    daemon = _disk_daemon(
        tmp_path,
        max_local_disk_size="256MiB",
        max_local_cpu_size="8MiB",  # two blocks: the fillers push the key out to disk only
    )
    rounds, resurrected = 30, 0
    with daemon, daemon.client() as writer, daemon.client() as deleter:
        readers = [daemon.client() for _ in range(3)]
        try:
            for r in range(rounds):
                writer.put([key], [_value(r, size)])
                writer.put(fillers, [_value(100 + i, size) for i in range(len(fillers))])
                assert writer.flush().complete
                go = threading.Barrier(len(readers) + 1)

                def read(client, go: threading.Barrier) -> None:
                    go.wait(30)
                    client.get([key])

                threads = [threading.Thread(target=read, args=(rc, go)) for rc in readers]
                for t in threads:
                    t.start()
                go.wait(30)
                deleter.delete([key])  # acknowledged while the reads are in flight
                for t in threads:
                    t.join(60)
                if writer.get([key])[0] is not None:
                    resurrected += 1
                    writer.delete([key])
        finally:
            for rc in readers:
                rc.close()
    assert resurrected == 0, f"the key came back after its delete in {resurrected}/{rounds} rounds"
