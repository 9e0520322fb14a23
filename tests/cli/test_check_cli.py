"""`lmcached check --config F [--fix]` against a disk tier a real daemon wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmcached.storage.blockfile import file_name
from lmcached.testing import DaemonProcess


def _check(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcached", "check", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_reports_then_fixes_damage(tmp_path: Path) -> None:
    keys = [f"k/{i}".encode() for i in range(4)]
    daemon = DaemonProcess(
        tmp_path / "d", local_disk=str(tmp_path / "disk"), max_local_disk_size="16MiB",
        num_workers=1,
    )  # fmt: skip
    with daemon:
        with daemon.client() as c:
            c.put(keys, [bytes([i]) * 100_000 for i in range(4)])
            c.flush()
        refused = _check(daemon.config_path, "--fix")
        assert refused.returncode == 1 and "running" in refused.stderr
        daemon.stop()
        shard = tmp_path / "disk" / "0"
        bad = shard / file_name(keys[0])
        data = bytearray(bad.read_bytes())
        data[-5] ^= 0xFF
        bad.write_bytes(bytes(data))
        os.truncate(shard / file_name(keys[1]), 50)
        (shard / ".tmp-99-1-1").write_bytes(b"torn")

        report = _check(daemon.config_path, "--json")
        assert report.returncode == 1, report.stderr
        doc = json.loads(report.stdout)
        assert doc["files"] == 4 and doc["ok"] == 2 and len(doc["problems"]) == 3

        fixed = _check(daemon.config_path, "--fix")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert "3 fixed" in fixed.stdout
        assert _check(daemon.config_path).returncode == 0
        daemon.start()
        with daemon.client() as c:
            got = c.get(keys)
            assert got[:2] == [None, None] and bytes(got[2]) == bytes([2]) * 100_000
