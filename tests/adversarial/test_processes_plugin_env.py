"""Plugins get a scrubbed environment: none of the daemon's secrets or key-file paths."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from lmcached.config import from_mapping
from lmcached.supervision.launcher import PluginLauncher

SECRET_URL = "redis://:hunter2@127.0.0.1:1/0"

DUMP_ENV = textwrap.dedent(
    """\
    #!/bin/bash
    env -0 > "$PLUGIN_OUT.tmp" && mv "$PLUGIN_OUT.tmp" "$PLUGIN_OUT"
    """
)


def test_plugins_receive_the_daemons_raw_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    script = plugins / "worker_env.sh"
    script.write_text(DUMP_ENV)
    script.chmod(0o755)
    dump = tmp_path / "env"
    daemon_env = {
        "LMCACHED_REMOTE_URL": SECRET_URL,
        "LMCACHE_REMOTE_URL": SECRET_URL,
        "LMCACHED_CURVE_CLIENT_KEY_FILE": "/etc/lmcached/engine.key_secret",
        "LMCACHED_CURVE_SECRET_KEY_FILE": "/etc/lmcached/server.key_secret",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OPERATOR_SETTING": "kept",
        "PLUGIN_OUT": str(dump),
    }
    for name, value in daemon_env.items():
        monkeypatch.setenv(name, value)
    cfg = from_mapping(
        {"plugin_locations": [str(plugins)], "num_workers": 1, "remote_url": SECRET_URL},
        environ={},
    )
    launcher = PluginLauncher(cfg, "worker", 0, control_endpoint="ipc:///run/x/control.sock")
    try:
        launcher.start()
        deadline = time.monotonic() + 30
        while not dump.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        launcher.stop()
    env = dict(item.split("=", 1) for item in dump.read_text().split("\0") if item and "=" in item)
    assert "hunter2" not in dump.read_text()
    for gone in (
        "LMCACHED_REMOTE_URL",
        "LMCACHE_REMOTE_URL",
        "LMCACHED_CURVE_CLIENT_KEY_FILE",
        "LMCACHED_CURVE_SECRET_KEY_FILE",
        "NOTIFY_SOCKET",
    ):
        assert gone not in env, gone
    assert env["LMCACHED_CONTROL_ENDPOINT"] == "ipc:///run/x/control.sock"
    assert env["LMCACHE_PLUGIN_ROLE"] == env["LMCACHE_RUNTIME_PLUGIN_ROLE"] == "WORKER"
    assert env["LANG"] == env["LC_ALL"] == "C.UTF-8"
    assert env["PATH"] and env["OPERATOR_SETTING"] == "kept"


def test_scrubbed_environment_keeps_what_is_addressed_to_plugins() -> None:
    from lmcached.supervision.launcher import scrubbed_environment

    env = scrubbed_environment(
        {
            "LMCACHED_REMOTE_URL": SECRET_URL,
            "LMCACHED_INTEGRITY_KEY_FILE": "/etc/lmcached/integrity.key",
            "LMCACHE_CONFIG_FILE": "/etc/lmcache.yaml",
            "LMCACHE_PLUGIN_SETTING_X": "1",
            "LMCACHE_RUNTIME_PLUGIN_NAME": "p",
            "LMCACHED_CONTROL_ENDPOINT": "ipc:///x",
            "WATCHDOG_USEC": "1000",
            "PATH": "/usr/bin",
            "HOME": "/var/lib/lmcached",
            "TMPDIR": "/tmp",
        }
    )
    assert env == {
        "LMCACHE_PLUGIN_SETTING_X": "1",
        "LMCACHE_RUNTIME_PLUGIN_NAME": "p",
        "LMCACHED_CONTROL_ENDPOINT": "ipc:///x",
        "PATH": "/usr/bin",
        "HOME": "/var/lib/lmcached",
        "TMPDIR": "/tmp",
    }
