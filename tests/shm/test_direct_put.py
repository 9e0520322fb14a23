"""The direct same-host put: a worker reads each block from the client's memory, once.

Its safety rules (lmcached.storage.peer_memory): only the connected process's memory, only
until the put's deadline, and a client never gets its buffers back while a worker may read them.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import msgpack
import numpy as np
import pytest

from lmcached import protocol
from lmcached.client import shared
from lmcached.client.connection import Call
from lmcached.errors import LMCachedRequestError, LMCachedTimeout
from lmcached.protocol import PutRequest
from lmcached.routing import owner
from lmcached.storage.peer_memory import PeerRefused, parse_peer_address
from lmcached.version import PROTOCOL_VERSION

from .helpers import cpu_stats, raw_put, worker_pid

MIB = 1 << 20


def _ops(c: Any) -> list[dict[str, Any]]:
    return [w["stats"]["ops"] for w in c.stats()["workers"]]


def _staging_memfds() -> list[str]:
    mine = f"/memfd:lmcached-stage-{os.getpid()}-"
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(mine):
                out.append(fd)
    return out


def test_a_same_host_put_is_read_once_from_the_callers_memory(daemon_factory):
    d = daemon_factory(num_workers=2, max_local_cpu_size="512MiB")
    big = np.frombuffer(os.urandom(24 * MIB), dtype=np.uint8).copy()  # parallel copy threads
    values: list[Any] = [
        big,
        bytearray(os.urandom(3 * MIB)),
        os.urandom(700_000),  # read-only bytes
        memoryview(bytearray(os.urandom(2 * MIB))).cast("I"),  # another item size
        np.arange(300_000, dtype=np.float32).reshape(600, 500)[:, :250],  # not contiguous
        b"",
    ]
    expected = [
        bytes(memoryview(v).cast("B")) if memoryview(v).c_contiguous else v.tobytes()
        for v in values
    ]
    keys = [f"direct/{i}".encode() for i in range(len(values))]
    with d.client(timeout=30) as c:
        c.put(keys, values)
        assert _staging_memfds() == []  # nothing staged: the workers read our memory
        total = sum(len(e) for e in expected)
        assert sum(o["bytes_in_direct"] for o in _ops(c)) == total
        # The caller owns its buffers again: what it writes now is not what was stored.
        big[:] = 0
        values[1][:] = b"\0" * len(values[1])
        assert [bytes(v) for v in c.get(keys)] == expected  # type: ignore[arg-type]


def test_a_put_the_caller_gave_up_on_stores_nothing_the_caller_wrote_after(daemon_factory):
    # The worker is stopped while the put is sent, so the put times out; the caller then reuses
    # its buffer. When the worker resumes, the put's deadline has passed: it must not store
    # the caller's new bytes (nor anything) under that key.
    d = daemon_factory(num_workers=1)
    buf = bytearray(b"a" * (4 * MIB))
    with d.client(timeout=30) as c:
        c.put([b"warm-up"], [b"x"])  # connected: the late put reaches the worker when it resumes
        pid = worker_pid(c, 0)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(LMCachedTimeout):
                c.put([b"late"], [buf], timeout=0.5)
            buf[:] = b"b" * len(buf)  # the caller's next use of its buffer
        finally:
            os.kill(pid, signal.SIGCONT)
        assert c.get([b"late"], timeout=30) == [None]
        assert cpu_stats(c)[0]["errors"] == 1  # the worker read it, too late to keep it
        c.put([b"late"], [buf])  # the same worker serves the next put
        assert bytes(c.get([b"late"])[0]) == b"b" * len(buf)


def test_a_failed_direct_put_returns_only_after_its_other_requests(daemon_factory):
    # Worker 0 is stopped with a direct put of ours in flight when worker 1 answers another
    # request with an error. Raising that error at once would hand the caller its buffers while
    # worker 0 may still read them: the call waits for worker 0's answer, or its deadline.
    d = daemon_factory(num_workers=2, direct_put=False)
    k0 = next(k for k in (f"w0/{i}".encode() for i in range(64)) if owner(k, 2) == 0)
    k1 = next(k for k in (f"w1/{i}".encode() for i in range(64)) if owner(k, 2) == 1)
    buf = bytearray(MIB)
    with d.client(timeout=30) as c:
        c.put([b"warm-up"], [b"x"])  # maps, connections
        pid = worker_pid(c, 0)
        deadline = time.monotonic() + 1.0
        until = int(deadline * 1e9)
        calls = [
            Call(
                w,
                PutRequest(
                    [k],
                    [len(buf)],
                    [()],
                    addrs=[shared.buffer_address(memoryview(buf))],
                    until=until,
                ),
            )
            for w, k in ((0, k0), (1, k1))
        ]
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(LMCachedRequestError, match="direct puts are off"):
                c._pipeline.execute(calls, deadline, borrowed=True)
            assert time.monotonic() >= deadline
        finally:
            os.kill(pid, signal.SIGCONT)


def _direct_put(d: Any, blocks: list[tuple[bytes, int, int]], until: int) -> dict[str, Any]:
    """Send a hand-written direct put of (key, address, size) blocks; return the reply header."""
    fields = {
        "keys": [k for k, _, _ in blocks],
        "sizes": [n for _, _, n in blocks],
        "nframes": [0] * len(blocks),
        "addrs": [a for _, a, _ in blocks],
        "until": until,
    }
    return raw_put(d, 0, fields)


def test_a_direct_put_stores_only_blocks_read_whole_and_in_time(daemon_factory):
    d = daemon_factory(num_workers=1)
    # 3 MiB of data, then 9 MiB nobody may read (PROT_NONE): a block running into it fails.
    region = mmap.mmap(-1, 12 * MIB)
    good = os.urandom(3 * MIB)
    region[: len(good)] = good
    addr = shared.buffer_address(memoryview(region))
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(addr + 3 * MIB, 9 * MIB, 0) == 0  # PROT_NONE
    later = time.monotonic_ns() + 30 * 10**9
    reply = _direct_put(
        d,
        [
            (b"whole", addr, len(good)),
            (b"unmapped", 4096, MIB),  # not this process's memory
            (b"past-the-end", addr + len(good) - 100, MIB),  # runs into the guard
            (b"parallel-past-the-end", addr, 10 * MIB),  # copied by threads, partly unreadable
        ],
        later,
    )
    assert reply["ok"] and reply["stored"] == 1
    reply = _direct_put(d, [(b"expired", addr, len(good))], time.monotonic_ns() - 1)
    assert reply["ok"] and reply["stored"] == 0
    with d.client() as c:
        missing = [b"unmapped", b"past-the-end", b"parallel-past-the-end", b"expired"]
        assert c.get(missing) == [None] * 4
        assert bytes(c.get([b"whole"])[0]) == good
        assert cpu_stats(c)[0]["errors"] == 4


def test_a_client_whose_worker_refuses_direct_puts_stages_them(daemon_factory):
    d = daemon_factory(num_workers=2, direct_put=False)
    keys = [f"staged/{i}".encode() for i in range(6)]
    vals = [os.urandom(MIB + i) for i in range(6)]
    with d.client(timeout=30) as c:
        c.put(keys, vals)
        assert [bytes(v) for v in c.get(keys)] == vals  # type: ignore[arg-type]
        assert len(set(_staging_memfds())) >= 1
        assert sum(o["bytes_in_direct"] for o in _ops(c)) == 0


_TURNS_UNREADABLE = textwrap.dedent(
    """
    import ctypes, os, sys
    from lmcached.client import Client
    from lmcached.storage.arena import slot_size
    MIB = 1 << 20
    keys = [f"refused/{i}".encode() for i in range(12)]
    sizes = [100_000, 12 * MIB, 3 * MIB] * 4  # one piece, two copy threads, several pieces
    vals = [os.urandom(n) for n in sizes]
    with Client.from_config(sys.argv[1], timeout=30) as c:
        c.put(keys[:6], vals[:6])
        ops = [w["stats"]["ops"] for w in c.stats()["workers"]]
        print("first", c._shm.direct, sum(o["bytes_in_direct"] for o in ops) == sum(sizes[:6]))
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        assert libc.prctl(4, 0, 0, 0, 0) == 0  # PR_SET_DUMPABLE: no more reads by others
        c.put(keys, vals[::-1])
        same = [bytes(v) for v in c.get(keys)] == vals[::-1]
        stats = [w["stats"]["store"]["cpu"] for w in c.stats()["workers"]]
        slots = sum(s["arena_slot_bytes"] for s in stats)
        print("then", c._shm.direct, same, slots == sum(slot_size(n) for n in sizes), flush=True)
    """
)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run the daemon without CAP_SYS_PTRACE",
)
def test_a_client_the_kernel_will_not_let_workers_read_stages_its_puts(daemon_factory):
    # Without CAP_SYS_PTRACE, a worker may read a process of its own user and capabilities
    # only while that process is dumpable. The client turns non-dumpable after its first put,
    # so the kernel refuses the next put's reads halfway (the worker had found it readable):
    # the client stages from then on, and no slot a refused copy took stays taken.
    no_ptrace = ["setpriv", "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace"]
    d = daemon_factory(num_workers=2, wrapper=no_ptrace, max_local_cpu_size="512MiB")
    child = subprocess.run(
        [*no_ptrace, sys.executable, "-c", _TURNS_UNREADABLE, str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout.split() == ["first", "True", "True", "then", "False", "True", "True"], (
        child.stdout + child.stderr
    )
    # This process has capabilities the workers lack: the kernel refuses them even the probe.
    with d.client(timeout=30) as c:
        c.put([b"root"], [b"r" * 5000])
        assert not c._shm.direct
        assert bytes(c.get([b"root"])[0]) == b"r" * 5000


_OTHER_TIME_NAMESPACE = textwrap.dedent(
    """
    import os, sys
    from lmcached.client import Client
    data = os.urandom(5 << 20)
    with Client.from_config(sys.argv[1], timeout=30) as c:
        c.put([b"timens"], [data])
        ok = bytes(c.get([b"timens"])[0]) == data
        print("direct" if c._shm.direct else "staged", ok, flush=True)
    """
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a time namespace")
def test_a_client_in_another_time_namespace_stages_its_puts(daemon_factory):
    # The put's deadline is on the client's CLOCK_MONOTONIC, which a time namespace offsets:
    # the worker must not read such a client's memory by a deadline it cannot compare.
    d = daemon_factory(num_workers=1)
    probe = subprocess.run(
        ["unshare", "--time", "--fork", "--monotonic", "100000", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"no time namespaces here: {probe.stderr.strip()}")
    child = subprocess.run(
        [
            "unshare",
            "--time",
            "--fork",
            "--monotonic",
            "100000",
            sys.executable,
            "-c",
            _OTHER_TIME_NAMESPACE,
            str(d.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout.split() == ["staged", "True"], child.stderr


def test_the_peer_address_of_a_connection_names_its_user_and_pid():
    assert parse_peer_address("localhost:1000:1000:4242") == (1000, 4242)
    for bad in (None, "", "127.0.0.1", "localhost:0:0:0", "a:b:c:d"):
        with pytest.raises(PeerRefused):
            parse_peer_address(bad)


def test_a_direct_put_header_is_validated():
    limits = protocol.Limits(
        max_block_size=MIB,
        max_keys_per_batch=16,
        max_key_length=64,
        max_request_bytes=4 * MIB,
        wire_frame_size=MIB,
    )
    base = {"v": PROTOCOL_VERSION, "op": "put", "id": 1, "keys": [b"k"], "sizes": [10]}
    bad = [
        {**base, "nframes": [0], "addrs": [1]},  # no deadline
        {**base, "nframes": [0], "addrs": [1], "until": -1},
        {**base, "nframes": [0], "addrs": [-1], "until": 1},
        {**base, "nframes": [0], "addrs": [1, 2], "until": 1},
        {**base, "nframes": [0], "addrs": [1], "until": 1, "stage": "x", "sums": [1]},
    ]
    for header in bad:
        with pytest.raises(protocol.ProtocolError) as err:
            protocol.decode_request(msgpack.packb(header), [], limits, protocol.DATA_OPS)
        assert err.value.code == protocol.E_MALFORMED
    framed = {**base, "nframes": [1], "addrs": [1], "until": 1}
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_request(msgpack.packb(framed), [b"x" * 10], limits, protocol.DATA_OPS)
    ok = protocol.decode_request(
        msgpack.packb({**base, "nframes": [0], "addrs": [123], "until": 5}),
        [],
        limits,
        protocol.DATA_OPS,
    )
    assert isinstance(ok, PutRequest) and ok.addrs == [123] and ok.until == 5


def test_an_in_place_put_sends_one_request_per_worker(daemon_factory):
    # Nothing is staged for a direct or buffer put, so its blocks need not be cut into small
    # requests: one request per worker lets the worker copy its blocks side by side (before,
    # 8 MiB requests cut a 32 MiB put into four, each copied, then answered, in turn).
    d = daemon_factory(num_workers=1, max_local_cpu_size="256MiB")
    n, size = 16, 2 * MIB
    direct = [bytearray(os.urandom(size)) for _ in range(n)]
    with d.client(timeout=30) as c:
        before = _ops(c)[0]["requests"].get("put", 0)
        c.put([f"one/d{i}".encode() for i in range(n)], direct)
        assert _ops(c)[0]["requests"]["put"] == before + 1
        buf = c.buffer(n * size)
        buf[:] = b"".join(direct)
        c.put(
            [f"one/b{i}".encode() for i in range(n)],
            [buf[i * size : (i + 1) * size] for i in range(n)],
        )
        ops = _ops(c)[0]
        assert ops["requests"]["put"] == before + 2
        assert ops["bytes_in_direct"] == ops["bytes_in_buffer"] == n * size
        got = c.get([f"one/{k}{i}".encode() for k in "db" for i in range(n)])
        assert [bytes(v) for v in got] == [bytes(v) for v in direct] * 2  # type: ignore[arg-type]
