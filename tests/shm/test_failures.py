"""Failure rules of the same-host path: kill -9 of a worker or of a client, restarts, access."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from lmcached.client.shared import check_view
from lmcached.testing import wait_until

from .helpers import worker_pid

MIB = 1 << 20


def test_worker_kill_9_leaves_held_views_readable_and_the_restart_gets_a_new_arena(
    daemon_factory,
):
    d = daemon_factory(num_workers=1)
    value = os.urandom(4 * MIB)
    with d.client(timeout=30) as c:
        c.put([b"before"], [value])
        view = c.get([b"before"])[0]
        old_arena = c.cluster_map["workers"][0]["arena"]
        old_pid = worker_pid(c, 0)
        os.kill(old_pid, signal.SIGKILL)
        # The mapping outlives the worker: the old bytes, never a fault.
        assert bytes(view) == value
        check_view(view)

        def restarted() -> dict | None:
            w = c.control("map")["map"]["workers"][0]
            return w if w["state"] == "up" and w["pid"] != old_pid else None

        new_arena = wait_until(restarted, 60, what="worker restart")["arena"]
        assert new_arena != old_arena
        assert not os.path.exists(old_arena)  # the new worker removed its predecessor's arena
        assert bytes(view) == value  # still mapped, still the old bytes
        c.put([b"after"], [b"new" * 1000])  # the client maps the new arena (map epoch moved)
        assert bytes(c.get([b"after"])[0]) == b"new" * 1000
        assert [a[0] for a in c.shared_arenas()] == [0]
        assert c.get([b"before"]) == [None]  # the CPU tier died with the worker


_PUTTER = textwrap.dedent(
    """
    import random, sys
    from lmcached.client import Client
    c = Client.from_config(sys.argv[1], timeout=30)
    i = 0
    while True:
        key = f"kill/{i}".encode()
        c.put([key], [random.Random(key).randbytes(3 << 20)])
        print(i, flush=True)
        i += 1
    """
)


def test_a_client_killed_mid_put_leaves_no_half_written_block(daemon_factory):
    d = daemon_factory(num_workers=2)
    rng = random.Random(1)
    for _round in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _PUTTER, str(d.config_path)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert child.stdout is not None
        for _ in range(rng.randint(2, 6)):  # a few puts committed, then killed mid-flight
            assert child.stdout.readline(), "the putting client died on its own"
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    with d.client(timeout=30) as c:
        keys = [f"kill/{i}".encode() for i in range(40)]
        got = c.get(keys)
        assert got[0] is not None
        for key, value in zip(keys, got, strict=True):
            if value is not None:
                assert bytes(value) == random.Random(key).randbytes(3 << 20)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a probe as user nobody")
def test_a_user_outside_the_group_cannot_map_the_arena(daemon_factory):
    d = daemon_factory(num_workers=1)
    arena = d.arena_paths()[0]
    nobody = pwd.getpwnam("nobody")

    def become_nobody() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    # Mapping needs an open descriptor first; `head` tries the open as that user (this
    # interpreter may live where nobody may not execute it).
    out = subprocess.run(
        ["head", "-c", "1", arena],
        preexec_fn=become_nobody,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "Permission denied" in out.stderr
    # A client running as that user falls back to ZMQ, which the ipc socket's mode refuses too.


def test_worker_kill_9_mid_put_leaves_only_whole_blocks(daemon_factory):
    import threading

    from lmcached.errors import LMCachedError

    d = daemon_factory(num_workers=1)
    with d.client(timeout=30) as c:
        pid = worker_pid(c, 0)
        started = threading.Event()

        def kill_soon() -> None:
            started.wait(30)
            os.kill(pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        keys = [f"wk/{i}".encode() for i in range(40)]
        try:
            for i, key in enumerate(keys):
                if i == 3:
                    started.set()
                # The worker may die under this put: an error, never a hang.
                with contextlib.suppress(LMCachedError):
                    c.put([key], [random.Random(key).randbytes(2 * MIB)])
        finally:
            started.set()
            killer.join()
        # Whatever survived (puts after the restart), every visible block is whole.
        for key, value in zip(keys, c.get(keys, timeout=60), strict=True):
            if value is not None:
                assert value == random.Random(key).randbytes(2 * MIB)


_ONE_PUT = textwrap.dedent(
    """
    import sys
    from lmcached.client import Client, shared
    shared.DIRECT_PUT = False  # the put that stages, in a memfd
    with Client.from_config(sys.argv[1], timeout=30) as c:
        c.put([b"gone/1"], [b"g" * (4 << 20)])
    print("done", flush=True)
    """
)


def test_a_worker_lets_go_of_the_staging_memfd_of_a_client_that_exited(daemon_factory):
    d = daemon_factory(num_workers=1)
    with d.client() as c:
        worker = worker_pid(c, 0)
    child = subprocess.run(
        [sys.executable, "-c", _ONE_PUT, str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert child.stdout.strip() == "done", child.stderr

    def maps_it() -> bool:
        with open(f"/proc/{worker}/maps") as f:
            return "memfd:lmcached-stage-" in f.read()

    # The worker mapped the child's memfd for the put; the child is gone, so once idle the
    # worker unmaps it (its pages would otherwise count in the worker's memory).
    wait_until(lambda: not maps_it(), timeout=30, what="the worker to unmap the dead memfd")
    with d.client() as c:
        assert bytes(c.get([b"gone/1"])[0]) == b"g" * (4 << 20)
