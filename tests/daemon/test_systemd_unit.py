"""systemd/lmcached.service passes `systemd-analyze verify` and declares readiness, watchdog,
restart and hardening settings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmcached import config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "lmcached.service"
ETC_CONFIG = ROOT / "config" / "lmcached.etc.yaml"
SHIPPED_BINARY = "/usr/local/bin/lmcached"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Parse a unit file into {Key: [values...]} (sections flattened; keys are unique here)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def real_exec_start() -> str:
    """The command that runs lmcached here: the installed script, else this interpreter."""
    installed = shutil.which("lmcached")
    return installed if installed else f"{sys.executable} -m lmcached"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text()
    assert SHIPPED_BINARY in text
    # verify checks that ExecStart's binary exists, so point it at the real one.
    rendered = tmp_path / "lmcached.service"
    rendered.write_text(text.replace(SHIPPED_BINARY, real_exec_start()))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(rendered)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify prints warnings on stderr with rc 0; any message about our unit is a defect.
    ours = [line for line in result.stderr.splitlines() if "lmcached.service" in line]
    assert result.returncode == 0, result.stderr
    assert ours == [], result.stderr


def test_unit_declares_notify_watchdog_restart_and_hardening():
    s = unit_settings(UNIT.read_text())
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": f"{SHIPPED_BINARY} start --config /etc/lmcached/lmcached.yaml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "User": "lmcached",
        "RuntimeDirectory": "lmcached",
        "StateDirectory": "lmcached",
        "LogsDirectory": "lmcached",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ReadWritePaths": "/var/lib/lmcached",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    for key, value in expected.items():
        assert s.get(key) == [value], key
    assert int(s["WatchdogSec"][0]) > 0
    assert int(s["LimitNOFILE"][0]) >= 65536
    assert s["LimitMEMLOCK"] == ["infinity"]


def test_etc_config_loads_and_points_runtime_dir_at_the_units_runtime_directory():
    cfg = config.load(ETC_CONFIG, environ={})
    units = unit_settings(UNIT.read_text())
    assert cfg.runtime_dir == "/run/" + units["RuntimeDirectory"][0]
    assert cfg.host == "127.0.0.1"
    assert cfg.metrics_host == "127.0.0.1"
    assert cfg.metrics_port
