"""Puts from Client.buffer: the worker copies each block from its own mapping of the client's
memfd (memcpy), with no copy in the client, and only while the client still waits."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import time
from typing import Any

import numpy as np

from lmcached.routing import owner
from lmcached.testing import wait_until

from .helpers import cpu_stats, raw_put, worker_pid

MIB = 1 << 20


def _ops(c: Any) -> list[dict[str, Any]]:
    return [w["stats"]["ops"] for w in c.stats()["workers"]]


def test_a_put_from_a_client_buffer_is_copied_by_the_worker_from_the_memfd(daemon_factory):
    d = daemon_factory(num_workers=2)
    with d.client(timeout=30) as c:
        buf = c.buffer(20 * MIB)
        arr = np.frombuffer(buf, dtype=np.uint8)
        arr[:] = np.frombuffer(os.urandom(buf.nbytes), dtype=np.uint8)
        keys = [f"buf/{i}".encode() for i in range(9)]
        # Blocks of several sizes, one of them large (copied in several pieces), one empty.
        bounds = [0, 1, 4096, MIB, MIB + 7, 3 * MIB, 3 * MIB, 5 * MIB, 12 * MIB, 20 * MIB]
        vals = [buf[a:b] for a, b in itertools.pairwise(bounds)]
        c.put(keys, vals)
        assert [bytes(v) for v in c.get(keys)] == [bytes(v) for v in vals]  # type: ignore[arg-type]
        ops = _ops(c)
        assert sum(o["bytes_in_buffer"] for o in ops) == 20 * MIB
        assert sum(o["bytes_in_direct"] for o in ops) == 0
        # A block that is not in the buffer makes the whole put a direct one.
        c.put([b"buf/mixed/0", b"buf/mixed/1"], [buf[:MIB], os.urandom(MIB)])
        ops = _ops(c)
        assert sum(o["bytes_in_buffer"] for o in ops) == 20 * MIB
        assert sum(o["bytes_in_direct"] for o in ops) == 2 * MIB
        kept = buf[:16]
    # The memory outlives the client that gave it out, while a view of it lives, and another
    # client of this process puts from it as from its own (a connector's new client after a
    # daemon restart keeps its host buffers).
    assert bytes(kept) == bytes(arr[:16])
    with d.client(timeout=30) as c:
        c.put([b"buf/later"], [kept])
        assert sum(o["bytes_in_buffer"] for o in _ops(c)) == 20 * MIB + 16
        assert c.get([b"buf/later"])[0] == bytes(kept)


def test_a_non_contiguous_value_is_put_while_the_process_has_a_buffer(daemon_factory):
    # Looking for the buffer that holds a put's blocks asked every value for its address,
    # and a strided view has none: the put raised a bare BufferError instead of storing it.
    d = daemon_factory(num_workers=1)
    with d.client(timeout=30) as c:
        buf = c.buffer(MIB)
        grid = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
        strided = memoryview(grid[:, 1:])
        inside = buf[: 4 * 1024]
        c.put([b"nc/strided", b"nc/inside"], [strided, inside])
        assert c.get([b"nc/strided"])[0] == grid[:, 1:].tobytes()
        # A put wholly in the buffer still takes the buffer's path.
        c.put([b"nc/inside"], [inside])
        assert sum(o["bytes_in_buffer"] for o in _ops(c)) == 4 * 1024


def _memfds() -> set[str]:
    """The memfds this process holds open (a mapping's own duplicate descriptor included)."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
    return {link for link in links if link.startswith("/memfd:")}


def test_a_buffer_closes_its_memfd_once_no_view_of_it_is_left(daemon_factory):
    d = daemon_factory(num_workers=1)
    before = _memfds()
    with d.client(timeout=30) as c:
        buf = c.buffer(MIB)
        block = buf[4096:8192]
    assert len(_memfds()) == len(before) + 1
    del buf
    assert len(_memfds()) == len(before) + 1  # the block's view still holds it
    del block
    gc.collect()
    assert _memfds() == before


def test_a_buffer_put_read_after_its_deadline_is_not_stored(daemon_factory):
    d = daemon_factory(num_workers=1)
    with d.client(timeout=30) as c:
        buf = c.buffer(MIB)
        buf[:] = os.urandom(MIB)
        c.ping()  # the map, so that the buffer can be named
        path = c._buffers.holding([buf])[0].path  # type: ignore[index]

        def put(key: bytes, until: int) -> dict[str, Any]:
            fields = {
                "keys": [key],
                "sizes": [MIB],
                "nframes": [0],
                "stage": path,
                "offsets": [0],
                "until": until,
            }
            return raw_put(d, owner(key, 1), fields)

        # The client gave up before the worker read its bytes: they may have changed since.
        late = put(b"late", time.monotonic_ns() - 1)
        assert late["ok"] and late["stored"] == 0
        in_time = put(b"in-time", time.monotonic_ns() + 30 * 10**9)
        assert in_time["ok"] and in_time["stored"] == 1
        assert c.get([b"late"]) == [None]
        assert bytes(c.get([b"in-time"])[0]) == bytes(buf)
        assert cpu_stats(c)[0]["errors"] == 1


def test_a_put_without_checksums_must_name_a_memfd_and_carry_a_deadline(daemon_factory):
    d = daemon_factory(num_workers=1)
    base = {"keys": [b"k"], "sizes": [8], "nframes": [0], "offsets": [0]}
    for fields in (
        # A staging file can be written by its neighbours: its puts are checked by checksums.
        {"stage": "/dev/shm/lmcached-stage-1-ab", "until": 1},
        # A memfd with checksums and a deadline: one rule or the other, not both.
        {"stage": "memfd:1:3:ab", "until": 1, "sums": [0]},
        # A memfd without either.
        {"stage": "memfd:1:3:ab"},
    ):
        reply = raw_put(d, 0, {**base, **fields})
        assert not reply["ok"] and reply["code"] == "malformed", (fields, reply)
    with d.client() as c:
        assert c.ping()  # still serving


def _stage_mappings(pid: int) -> int:
    """How many of this process's staging memfds (Client.buffer) worker ``pid`` maps."""
    mine = f"/memfd:lmcached-stage-{os.getpid()}-"
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if mine in line)


def test_a_buffer_its_process_dropped_leaves_the_workers_memory(daemon_factory):
    # The worker maps a buffer to copy from it; once this (live) process drops the buffer, the
    # worker's mapping was the last thing keeping its pages: they must not stay there, outside
    # every budget, until this process exits.
    d = daemon_factory(num_workers=1)
    with d.client(timeout=30) as c:
        pid = worker_pid(c, 0)
        for i in range(3):
            buf = c.buffer(4 * MIB)
            buf[:] = bytes([i]) * buf.nbytes
            c.put([f"dropped/{i}".encode()], [buf])
            del buf
            gc.collect()  # the last view is gone: this process closed the memfd
        wait_until(lambda: _stage_mappings(pid) == 0, 10, what="the worker to unmap the buffers")
        kept = c.buffer(MIB)  # a buffer still held stays mapped
        c.put([b"dropped/kept"], [kept])
        time.sleep(1.5)  # three idle sweeps at least
        assert _stage_mappings(pid) == 1
        assert [bytes(v)[:1] for v in c.get([f"dropped/{i}".encode() for i in range(3)])] == [
            b"\0",
            b"\1",
            b"\2",
        ]
