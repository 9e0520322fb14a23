"""malloc tuning: accepted by glibc, and large blocks round-trip exactly under every setting."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

CLIENT = r"""
import hashlib, os, sys
from lmcached.client import Client
from lmcached.malloc import tune_for_large_messages
assert tune_for_large_messages(), "glibc refused the malloc settings"
value = os.urandom((40 << 20) + 7)  # 3 sub-frames
with Client(sys.argv[1], timeout=30) as c:
    c.put([b"malloc/" + sys.argv[2].encode()], [value])
    got = c.get([b"malloc/" + sys.argv[2].encode()])[0]
print(hashlib.sha256(got).hexdigest() == hashlib.sha256(value).hexdigest())
"""


@pytest.mark.parametrize("setting", ["default", "no-mmap"])
def test_large_blocks_round_trip_under_each_malloc_setting(shared_daemon, setting):
    env = {**os.environ}
    env.pop("LMCACHED_MALLOC", None)
    if setting != "default":
        env["LMCACHED_MALLOC"] = setting
    out = subprocess.run(
        [sys.executable, "-c", CLIENT, shared_daemon.endpoint, setting],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_workers_report_their_heap_in_use_and_kept(shared_daemon):
    with shared_daemon.client(timeout=30) as c:
        workers = c.stats()["workers"]
    assert len(workers) == 2
    for w in workers:
        heap = w["stats"]["heap"]
        # glibc: bytes in use are a live worker's Python heap at least; freed ones never negative.
        assert heap["in_use"] > 1 << 20 and heap["free"] >= 0
        assert heap["arena"] <= heap["in_use"] + heap["free"]


def test_an_idle_worker_gives_back_the_heap_a_burst_of_puts_left(daemon_factory):
    # glibc keeps freed memory for the next message (trim threshold 512 MiB). A put of 384 MiB
    # over ZMQ, 256 MiB of it in flight at once, on a 64 MiB budget left the worker's RSS
    # ~250 MiB above that budget for good: memory of no cache and no budget. Once idle, the
    # worker trims what it keeps beyond 64 MiB.
    psutil = pytest.importorskip("psutil")
    from lmcached.testing import wait_until

    mib = 1 << 20
    d = daemon_factory(num_workers=1, max_local_cpu_size="64MiB", max_inflight_bytes="256MiB")
    with d.client(timeout=60, shared_memory=False) as c:
        worker = psutil.Process(c.cluster_map["workers"][0]["pid"])
        value = os.urandom(16 * mib)
        c.put([f"burst/{i:02d}".encode() for i in range(24)], [value] * 24)
        # The budget's 64 MiB of blocks, the 64 MiB the heap may keep, and the worker itself.
        wait_until(
            lambda: worker.memory_info().rss <= 64 * mib + 64 * mib + 40 * mib,
            timeout=15,
            what="the idle worker to give its kept heap back",
        )
        assert bytes(c.get([b"burst/23"])[0]) == value  # the newest blocks are still served


GLIBC_CALLS = r"""
from lmcached.malloc import heap_usage, release_free_memory, tune_for_large_messages
tune_for_large_messages(daemon=True)
assert heap_usage() is not None
release_free_memory()
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_allocator_calls_a_worker_makes_start_no_process(tmp_path) -> None:
    # A worker killed while a child of its runs leaves that child to the scheduler (its
    # subreaper) as a zombie nobody reaps; find_library("c") forked ldconfig on every stats call.
    trace = tmp_path / "trace.txt"
    subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(trace),
            "-e",
            "trace=execve",
            sys.executable,
            "-c",
            GLIBC_CALLS,
        ],
        check=True,
        timeout=60,
    )
    execs = [line for line in trace.read_text().splitlines() if "execve(" in line]
    assert len(execs) == 1, execs  # the interpreter itself, nothing else
