"""`lmcached reload` compares converted values: '256MiB' in the file is the 268435456 running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from lmcached.testing import DaemonProcess


def _reload(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcached", "reload", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_reload_of_an_unchanged_file_reports_no_phantom_restart_keys(tmp_path: Path) -> None:
    # Sizes with units, as people write them: the running config holds them as byte counts.
    daemon = DaemonProcess(
        tmp_path / "d", num_workers=1, max_local_cpu_size="256MiB", write_queue_size="64MiB"
    )
    with daemon:
        unchanged = _reload(daemon.config_path)
        assert unchanged.returncode == 0, unchanged.stderr
        assert "need a restart" not in unchanged.stdout, unchanged.stdout

        values = yaml.safe_load(daemon.config_path.read_text())
        values["write_queue_size"] = "32MiB"
        daemon.config_path.write_text(yaml.safe_dump(values))
        changed = _reload(daemon.config_path)
        assert changed.returncode == 0, changed.stderr
        assert "changed keys that need a restart: write_queue_size" in changed.stdout
