"""Same-host clients use the workers' shared-memory arenas automatically; others keep ZMQ."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

import pytest
import xxhash
import zmq

from lmcached import protocol, runtime
from lmcached.client import Client, shared
from lmcached.client.shared import LeasedView, check_view
from lmcached.routing import owner
from lmcached.shm.layout import memfd_stage, stage_file_name

from .helpers import cpu_stats, raw_put, raw_request

MIB = 1 << 20


def test_a_same_host_client_puts_and_gets_through_the_arena(daemon_factory):
    d = daemon_factory(num_workers=2, max_local_cpu_size="256MiB")
    keys = [f"sh/{i}".encode() for i in range(16)]
    vals = [os.urandom(2 * MIB) for _ in keys]
    with d.client(timeout=30) as c:
        c.put(keys, vals, metas=[{"i": i} for i in range(16)])
        arenas = c.shared_arenas()
        assert [w for w, _view, _size in arenas] == [0, 1]
        got = c.get_with_meta(keys)
        for i, (value, meta) in enumerate(got):  # type: ignore[misc]
            assert isinstance(value.obj, LeasedView)  # zero-copy, straight from the arena
            assert value.readonly
            assert value == vals[i] and meta == {"i": i}
            check_view(value)
        bufs = [bytearray(2 * MIB) for _ in keys]
        assert c.get_into(keys, bufs) == [True] * 16
        assert bufs == vals
        del got, value
        stats = cpu_stats(c)
        assert sum(s["arena_slot_bytes"] for s in stats) == 32 * MIB
        # No payload crossed a socket on the put: only headers did.
        ops = [w["stats"]["ops"] for w in c.stats()["workers"]]
        assert sum(o["bytes_in"] for o in ops) == 32 * MIB
        # The workers read every block from this process's memory (one copy, no staging).
        assert sum(o["bytes_in_direct"] for o in ops) == 32 * MIB
        # Nor on the two gets: every byte read went out as an arena slot.
        assert sum(o["bytes_out_shared"] for o in ops) == sum(o["bytes_out"] for o in ops)
        assert sum(o["bytes_out"] for o in ops) == 64 * MIB
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o640 for p in d.arena_paths())


def test_a_tcp_client_and_a_same_host_client_share_one_cluster(daemon_factory):
    d = daemon_factory(num_workers=2, enable_tcp=True)
    keys = [f"mixed/{i}".encode() for i in range(8)]
    vals = [os.urandom(300_000) for _ in keys]
    with d.client(timeout=30) as local, Client(d.endpoint, timeout=30, transport="tcp") as remote:
        local.put(keys[:4], vals[:4])
        remote.put(keys[4:], vals[4:])
        assert local.shared_arenas() and remote.shared_arenas() == []
        assert [bytes(v) for v in remote.get(keys)] == vals  # type: ignore[arg-type]
        # The remote put's blocks stay in the frames they arrived in (no copy into the arena)...
        assert sum(t["entries_outside_arena"] for t in cpu_stats(local)) == 4
        # ...until a same-host client reads them: each moves into the slot it reserved, once,
        # and every block of the local get comes from the arena.
        assert [bytes(v) for v in local.get(keys)] == vals  # type: ignore[arg-type]
        assert sum(t["entries_outside_arena"] for t in cpu_stats(local)) == 0
        assert sum(t.get("settled", 0) for t in cpu_stats(local)) == 4
        got = remote.get(keys[4:5])[0]
        assert not isinstance(got.obj, LeasedView) and bytes(got) == vals[4]  # ZMQ, from a slot
        ops = [w["stats"]["ops"] for w in local.stats()["workers"]]
        assert sum(o["bytes_out_shared"] for o in ops) == 8 * 300_000
        assert sum(o["bytes_in_direct"] for o in ops) == 4 * 300_000  # the local put only
        assert sum(o["bytes_out"] for o in ops) == 17 * 300_000


def test_a_zmq_get_of_an_arena_block_comes_in_wire_sized_frames(daemon_factory):
    # A block is one arena slot; over ZMQ it must still travel in frames of at most
    # wire_frame_size, or every reply of a 32 MiB block lands in fresh pages on the client.
    d = daemon_factory(num_workers=1, max_local_cpu_size="256MiB", wire_frame_size="8MiB")
    value = os.urandom(20 * MIB)
    with d.client() as c:
        c.put([b"big"], [value])
    reply, frames = raw_request(d, 0, {"op": "get", "keys": [b"big"]})
    assert reply["ok"] and reply["nframes"] == [3]
    assert [len(f) for f in frames] == [8 * MIB, 8 * MIB, 4 * MIB]
    assert b"".join(frames) == value


def test_a_zmq_put_keeps_its_frames_and_is_refused_when_its_checksum_is_wrong(daemon_factory):
    # A ZMQ put is stored in the frames it arrived in, outside the arena, but a checksum sent
    # with it is still checked before the block is stored.
    d = daemon_factory(num_workers=1)
    data = os.urandom(3 * MIB)  # a few hash pieces: the check runs in steps
    good = xxhash.xxh3_64_intdigest(data)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(runtime.ipc_endpoint(d.cfg, "worker-0"))
    try:
        for rid, (key, checksum) in enumerate([(b"zmq/bad", good ^ 1), (b"zmq/good", good)], 1):
            put = protocol.PutRequest([key], [len(data)], [[data]], sums=[checksum], id=rid)
            sock.send_multipart([protocol.encode_request(put), *protocol.payload_of(put)])
            assert sock.poll(20_000)
            raw = protocol.parse_reply(sock.recv_multipart()[0])
            assert raw.ok and raw.header["stored"] == (key == b"zmq/good")
    finally:
        sock.close()
        ctx.term()
    with d.client() as c:
        stats = cpu_stats(c)[0]
        assert stats["checksum_rejected"] == 1 and stats["entries_outside_arena"] == 1
        assert stats["arena_slot_bytes"] == 4 * MIB  # its slot is reserved, unbacked
        assert c.get([b"zmq/bad"]) == [None]
        # A same-host read moves the block into its slot and gets it from the arena.
        got = c.get([b"zmq/good"])[0]
        assert isinstance(got.obj, LeasedView) and bytes(got) == data
        stats = cpu_stats(c)[0]
        assert stats["entries_outside_arena"] == 0 and stats["settled"] == 1
        assert stats["arena_slot_bytes"] == 4 * MIB  # the same slot, now backed


def test_with_shared_memory_off_the_map_has_no_arena_and_zmq_serves(daemon_factory):
    d = daemon_factory(num_workers=1, shared_memory=False)
    with d.client() as c:
        c.put([b"off/a"], [b"abc"])
        assert c.shared_arenas() == []
        assert bytes(c.get([b"off/a"])[0]) == b"abc"
        assert all(w["arena"] is None for w in c.cluster_map["workers"])
    assert d.arena_paths() == []


def _staged_put(d, key: bytes, data: bytes, checksum: int, stage_path: str) -> dict:
    """Send a hand-written same-host put through a raw socket; return the reply header."""
    fields = {
        "keys": [key],
        "sizes": [len(data)],
        "nframes": [0],
        "sums": [checksum],
        "stage": stage_path,
        "offsets": [0],
    }
    return raw_put(d, owner(key, d.cfg.num_workers), fields)


def test_a_staged_block_whose_bytes_do_not_match_its_checksum_is_not_stored(daemon_factory):
    d = daemon_factory(num_workers=1)
    directory = os.path.dirname(d.arena_paths()[0])
    path = os.path.join(directory, stage_file_name(os.getpid(), "scribble"))
    data = os.urandom(100_000)
    try:
        with open(path, "wb") as f:
            f.write(b"X" * len(data))  # a neighbour changed the bytes after they were hashed
        reply = _staged_put(d, b"scribbled", data, xxhash.xxh3_64_intdigest(data), path)
        assert reply["ok"] and reply["stored"] == 0
        with open(path, "wb") as f:
            f.write(data[:1000])  # cut short: the read comes up short, no SIGBUS
        reply = _staged_put(d, b"scribbled", data, xxhash.xxh3_64_intdigest(data), path)
        assert reply["ok"] and reply["stored"] == 0
        with open(path, "wb") as f:
            f.write(data)
        reply = _staged_put(d, b"honest", data, xxhash.xxh3_64_intdigest(data), path)
        assert reply["ok"] and reply["stored"] == 1
    finally:
        os.unlink(path)
    with d.client() as c:
        assert c.get([b"scribbled"]) == [None]
        assert bytes(c.get([b"honest"])[0]) == data
        assert cpu_stats(c)[0]["checksum_rejected"] == 1


@pytest.mark.parametrize("stage", ["/etc/passwd", "/dev/shm/../etc/passwd", "relative"])
def test_a_put_naming_a_file_that_is_not_a_staging_file_is_refused(daemon_factory, stage):
    d = daemon_factory(num_workers=1)
    reply = _staged_put(d, b"k", b"x", xxhash.xxh3_64_intdigest(b"x"), stage)
    assert not reply["ok"] and reply["code"] == "malformed"
    with d.client() as c:
        assert c.get([b"k"]) == [None]


def _my_staging_memfds() -> list[str]:
    """This process's open staging memfds, as /proc names their links."""
    mine = f"/memfd:lmcached-stage-{os.getpid()}-"
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith(mine):
                out.append(link)
    return out


def test_a_client_dropped_without_close_removes_its_staging_file(daemon_factory, monkeypatch):
    import gc
    import glob

    monkeypatch.setattr(shared, "DIRECT_PUT", False)  # the put that stages (two copies)
    monkeypatch.setattr(shared, "MEMFD_STAGING", False)  # the fallback: a file in /dev/shm
    d = daemon_factory(num_workers=1)
    mine = f"/dev/shm/lmcached-stage-{os.getpid()}-*"
    c = d.client()
    c.put([b"dropped"], [b"x" * 10_000])
    assert len(glob.glob(mine)) == 1
    del c
    gc.collect()
    assert glob.glob(mine) == []


def test_a_client_stages_in_a_sealed_memfd_that_goes_with_it(daemon_factory, monkeypatch):
    import gc
    import glob

    monkeypatch.setattr(shared, "DIRECT_PUT", False)  # the put that stages (two copies)
    d = daemon_factory(num_workers=1)
    c = d.client()
    data = os.urandom(3 * MIB)
    c.put([b"memfd"], [data])
    assert bytes(c.get([b"memfd"])[0]) == data
    # No file in /dev/shm: a memfd, sealed so that it can never shrink under the worker.
    assert glob.glob(f"/dev/shm/lmcached-stage-{os.getpid()}-*") == []
    assert len(set(_my_staging_memfds())) == 1  # (mmap holds a dup of the descriptor)
    del c
    gc.collect()
    assert _my_staging_memfds() == []


def test_a_staged_put_larger_than_the_staging_area_runs_in_rounds(daemon_factory, monkeypatch):
    monkeypatch.setattr(shared, "DIRECT_PUT", False)  # the put that stages (two copies)
    monkeypatch.setattr(shared, "MIN_STAGING", 4 * MIB)  # two 1 MiB blocks' room, at least
    d = daemon_factory(num_workers=2, max_block_size="1MiB")
    keys = [f"rounds/{i}".encode() for i in range(24)]
    vals = [os.urandom(MIB - 7 * i) for i in range(24)]  # 24 MiB through a 4 MiB area
    with d.client(timeout=30) as c:
        c.put(keys, vals)
        assert c._shm._staging.size == 4 * MIB
        assert [bytes(v) for v in c.get(keys)] == vals  # type: ignore[arg-type]


def test_a_client_whose_memfd_a_worker_refuses_stages_in_a_file(daemon_factory, monkeypatch):
    import glob

    monkeypatch.setattr(shared, "DIRECT_PUT", False)  # the put that stages (two copies)
    d = daemon_factory(num_workers=2)
    # The name the worker checks no longer matches the memfd, as when the worker cannot see
    # this process in its /proc: the worker refuses it, and the client falls back.
    monkeypatch.setattr(shared, "memfd_stage", lambda pid, fd, nonce: f"memfd:{pid}:{fd}:0bad")
    data = [os.urandom(MIB) for _ in range(8)]
    keys = [f"fallback/{i}".encode() for i in range(8)]
    with d.client() as c:
        c.put(keys, data)
        assert [bytes(v) for v in c.get(keys)] == data
        assert len(glob.glob(f"/dev/shm/lmcached-stage-{os.getpid()}-*")) == 1
        c.put(keys, data[::-1])
        assert [bytes(v) for v in c.get(keys)] == data[::-1]


class _Memfd:
    """A hand-made staging memfd named as a client names its own."""

    def __init__(self, data: bytes, size: int, seal: bool = True) -> None:
        self.nonce = "feedc0de"
        name = stage_file_name(os.getpid(), self.nonce)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        os.pwrite(self.fd, data, 0)
        if seal:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.stage = memfd_stage(os.getpid(), self.fd, self.nonce)

    def close(self) -> None:
        os.close(self.fd)


def test_a_memfd_stage_is_mapped_only_when_it_is_a_sealed_staging_memfd(daemon_factory):
    d = daemon_factory(num_workers=1)
    data = os.urandom(100_000)
    checksum = xxhash.xxh3_64_intdigest(data)
    unsealed = _Memfd(data, MIB, seal=False)  # could shrink under a mapping: SIGBUS
    try:
        reply = _staged_put(d, b"unsealed", data, checksum, unsealed.stage)
        assert not reply["ok"] and reply["code"] == "malformed"
        assert "sealed" in reply["error"]
    finally:
        unsealed.close()
    # A descriptor of another file, under a staging memfd's name: its link says otherwise.
    with open(__file__, "rb") as f:
        other = memfd_stage(os.getpid(), f.fileno(), "feedc0de")
        reply = _staged_put(d, b"other", data, checksum, other)
    assert not reply["ok"] and reply["code"] == "malformed"
    # A FIFO without a writer: opening it for reading would block the worker for ever.
    fifo = os.path.join(os.path.dirname(d.config_path), "fifo")
    os.mkfifo(fifo)
    fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        reply = _staged_put(d, b"fifo", data, checksum, memfd_stage(os.getpid(), fifo_fd, "ab"))
        assert not reply["ok"] and reply["code"] == "malformed"
    finally:
        os.close(fifo_fd)
    for bad in ("memfd:1", "memfd:x:1:2", f"memfd:{os.getpid()}:99999:feedc0de"):
        reply = _staged_put(d, b"bad", data, checksum, bad)
        assert not reply["ok"] and reply["code"] == "malformed"
    with d.client() as c:
        assert c.get([b"unsealed", b"other", b"bad"]) == [None, None, None]


def test_a_sealed_memfd_stage_is_verified_like_a_staging_file(daemon_factory):
    d = daemon_factory(num_workers=1)
    data = os.urandom(100_000)
    checksum = xxhash.xxh3_64_intdigest(data)
    scribbled = _Memfd(b"X" * len(data), MIB)  # bytes changed after they were hashed
    short = _Memfd(data[:1000], 4096)  # a block that runs past the memfd's end
    honest = _Memfd(data, MIB)
    try:
        reply = _staged_put(d, b"scribbled", data, checksum, scribbled.stage)
        assert reply["ok"] and reply["stored"] == 0
        reply = _staged_put(d, b"short", data, checksum, short.stage)
        assert reply["ok"] and reply["stored"] == 0
        reply = _staged_put(d, b"honest", data, checksum, honest.stage)
        assert reply["ok"] and reply["stored"] == 1
    finally:
        for m in (scribbled, short, honest):
            m.close()
    with d.client() as c:
        assert c.get([b"scribbled", b"short"]) == [None, None]
        assert bytes(c.get([b"honest"])[0]) == data
        stats = cpu_stats(c)[0]
        assert stats["checksum_rejected"] == 1 and stats["errors"] == 2
