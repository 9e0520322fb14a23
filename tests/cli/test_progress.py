"""Long operations show progress: `check` on a terminal (and never into a pipe), and a worker
resharding its disk tier at start, in the log."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

from lmcached.testing import DaemonProcess


def _disk_daemon(tmp_path: Path, name: str, num_workers: int) -> DaemonProcess:
    return DaemonProcess(
        tmp_path / name,
        local_disk=str(tmp_path / "disk"),
        max_local_disk_size="16MiB",
        num_workers=num_workers,
    )


def _fill_disk(tmp_path: Path, n: int = 6) -> DaemonProcess:
    daemon = _disk_daemon(tmp_path, "d1", 1)
    with daemon, daemon.client() as c:
        c.put([f"p/{i}".encode() for i in range(n)], [bytes([i]) * 10_000 for i in range(n)])
        c.flush()
    return daemon


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            return out
        if not chunk:
            return out
        out += chunk


def test_check_shows_progress_on_a_terminal_only(tmp_path: Path) -> None:
    daemon = _fill_disk(tmp_path)
    cmd = [sys.executable, "-m", "lmcached", "check", "-c", str(daemon.config_path)]
    primary, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        drawn = _read_all(primary)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(primary)
    assert proc.returncode == 0, drawn
    assert b"checking " in drawn and b"block files" in drawn
    assert b"6 block files" in stdout  # the result itself stays on stdout
    piped = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == ""


def test_resharding_at_start_is_logged_as_it_begins(tmp_path: Path) -> None:
    _fill_disk(tmp_path)
    daemon = _disk_daemon(tmp_path, "d2", 2)
    with daemon:
        pass
    events = []
    for line in daemon.log().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    started = [e for e in events if e.get("event") == "disk shard resharding"]
    assert started and started[0]["shards"] >= 1, daemon.log()
