"""A real daemon with an LMCache-style external backend: lookups reach it, its metrics show in
stats, a failing on_startup disables it (or, with strict_plugins, stops the daemon)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmcached.routing import owner
from lmcached.testing import DaemonProcess

MODULE = "lmcached_example_plugins.sqlite_backend"


def sqlite_config(path_template: str, **more) -> dict:
    return {
        "external_backends": ["sqlite"],
        "extra_config": {
            "external_backend.sqlite.module_path": MODULE,
            "external_backend.sqlite.class_name": "SqliteBackend",
            "external_backend.sqlite.path": path_template,
        },
        **more,
    }


def env_with(example_target) -> dict[str, str]:
    paths = [str(example_target), os.getcwd()]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def preload(path: str, key: bytes, value: bytes) -> None:
    from lmcached_example_plugins.sqlite_backend import SqliteBackend

    from lmcached.storage.base import Block

    backend = SqliteBackend({"path": path})
    backend.on_startup()
    backend.put(key, Block.from_bytes(value))
    backend.close()


def test_daemon_reads_through_an_external_backend(example_installed, tmp_path):
    template = str(tmp_path / "blocks-{worker_id}.sqlite")
    key = b"ns/m@0/any/" + b"ab" * 16
    preload(template.replace("{worker_id}", str(owner(key, 2))), key, b"stored by sqlite")
    with DaemonProcess(
        tmp_path / "d", env=env_with(example_installed), **sqlite_config(template)
    ) as d:
        with d.client() as c:
            assert c.get([key]) == [b"stored by sqlite"]
            status = c.stats()
        mine = next(w for w in status["workers"] if w["id"] == owner(key, 2))
        assert mine["stats"]["extensions"]["sqlite"]["state"] == "running"
        assert mine["stats"]["store"]["sqlite"]["plugin"]["hits"] == 1
        assert mine["stats"]["store"]["sqlite"]["plugin_errors"] == 0


def test_backend_failing_on_startup_is_disabled_and_the_daemon_serves(example_installed, tmp_path):
    template = str(tmp_path / "no-such-dir" / "blocks-{worker_id}.sqlite")
    with DaemonProcess(
        tmp_path / "d", env=env_with(example_installed), **sqlite_config(template)
    ) as d:
        with d.client() as c:
            c.put([b"k/1"], [b"v"])
            assert c.get([b"k/1"]) == [b"v"]
            status = c.stats()
        for w in status["workers"]:
            state = w["stats"]["extensions"]["sqlite"]
            assert state["state"] == "disabled"
            assert "unable to open database file" in state["error"]
            assert "sqlite" not in w["stats"]["store"]
        out = subprocess.run(
            [sys.executable, "-m", "lmcached", "status", "--config", str(d.config_path)],
            capture_output=True,
            text=True,
            env=d.env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        rows = [line.split() for line in out.stdout.splitlines() if " sqlite " in line]
        assert [r[:4] for r in rows] == [
            ["0", "sqlite", "storage_backend", "disabled"],
            ["1", "sqlite", "storage_backend", "disabled"],
        ]
    assert "plugin failed to start" in d.log()


def test_strict_plugins_makes_a_failing_backend_fatal(example_installed, tmp_path):
    template = str(tmp_path / "no-such-dir" / "blocks-{worker_id}.sqlite")
    d = DaemonProcess(
        tmp_path / "d",
        env=env_with(example_installed),
        **sqlite_config(template, strict_plugins=True),
    )
    try:
        with pytest.raises(RuntimeError, match="exited with 78"):
            d.start()
        assert "unable to open database file" in d.log()
    finally:
        d.close()
