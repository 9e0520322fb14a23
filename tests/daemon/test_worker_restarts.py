"""Process supervision: crashed workers come back, clients recover, shutdown leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil

from lmcached.testing import wait_until


def _alive(pids):
    return [
        p
        for p in pids
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]


def test_sigkill_of_a_worker_mid_run_is_survived_by_daemon_and_client(daemon_factory):
    d = daemon_factory(num_workers=2)
    keys = [f"kill/{i}".encode() for i in range(32)]
    with d.client(timeout=15) as c:
        c.put(keys, [b"v" * 1000] * 32)
        epoch = c.cluster_map["epoch"]
        victim = d.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        # The same Client object keeps working: it notices the new map and resends once.
        for i in range(20):
            c.put([f"after/{i}".encode()], [b"x"])
        got = c.get([f"after/{i}".encode() for i in range(20)])
        assert all(bytes(g) == b"x" for g in got)
        new_map = c.cluster_map
        assert new_map["epoch"] > epoch
        assert victim not in [w["pid"] for w in new_map["workers"]]
        assert sum(w["restarts"] for w in new_map["workers"]) == 1
        # Blocks of the surviving worker are still there; the restarted one starts empty.
        assert 0 < sum(c.exists(keys)) < 32


def test_whole_daemon_restart_under_a_live_client(daemon_factory):
    d = daemon_factory(num_workers=2)
    with d.client(timeout=20) as c:
        c.put([b"before"], [b"1"])
        first = c.cluster_map["daemon_id"]
        assert d.stop() == 0
        d.start()
        # Not rebuilt: the same Client finds the new daemon (new ports) and serves.
        c.put([b"after"], [b"2"])
        assert bytes(c.get([b"after"])[0]) == b"2"
        assert c.cluster_map["daemon_id"] != first


def test_sigterm_leaves_no_process_behind_and_exits_zero(daemon_factory):
    d = daemon_factory(num_workers=3)
    pids = d.all_pids()
    assert len(pids) == 4
    code = d.stop()
    assert code == 0
    wait_until(lambda: not _alive(pids), 5, what="every daemon process to exit")


def test_cli_status_and_stop(daemon_factory):
    d = daemon_factory(num_workers=2)
    cli = [sys.executable, "-m", "lmcached"]
    out = subprocess.run(
        [*cli, "status", "--config", str(d.config_path)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "worker" in out.stdout and "up" in out.stdout
    js = subprocess.run(
        [*cli, "status", "--json", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    import json

    doc = json.loads(js.stdout)
    assert doc["running"] is True and len(doc["workers"]) == 2
    assert all(w["memory"]["uss"] > 0 for w in doc["workers"])
    pids = d.all_pids()
    stop = subprocess.run(
        [*cli, "stop", "--config", str(d.config_path)], capture_output=True, text=True, timeout=30
    )
    assert stop.returncode == 0, stop.stderr
    assert d.proc is not None
    assert d.proc.wait(15) == 0
    wait_until(lambda: not _alive(pids), 5, what="every daemon process to exit")
    down = subprocess.run(
        [*cli, "status", "--config", str(d.config_path), "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert down.returncode != 0


def test_second_daemon_on_the_same_runtime_folder_is_refused(daemon_factory, tmp_path):
    d = daemon_factory(num_workers=1)
    out = subprocess.run(
        [sys.executable, "-m", "lmcached", "start", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "already runs" in out.stderr
    # The first daemon is untouched.
    with d.client() as c:
        c.ping()
