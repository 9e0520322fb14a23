"""An operator's mistakes at start: a taken port, a config whose workers cannot start. Each ends
in one line on stderr and a prompt exit, and the CLI never calls a live scheduler "not running"."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmcached import config as config_mod
from lmcached import runtime
from lmcached.shm.layout import ARENA_PREFIX, instance_tag
from lmcached.testing import wait_until

# Generous on two loaded cores; a hang is what these tests catch, not slowness.
EXIT_DEADLINE_S = 60


@pytest.fixture(autouse=True)
def short_runtime_dir() -> Iterator[str]:
    """A runtime folder with a short path (ipc paths are limited to 107 bytes), removed after."""
    path = tempfile.mkdtemp(prefix="lmrt-", dir="/tmp")
    _RUNTIME[0] = path
    yield path
    shutil.rmtree(path, ignore_errors=True)


_RUNTIME = [""]


def _write_config(tmp_path: Path, **values: Any) -> Path:
    base: dict[str, Any] = {
        "num_workers": 1,
        "max_local_cpu_size": "64MiB",
        "metrics_port": None,
        "runtime_dir": _RUNTIME[0],
    }
    base.update(values)
    path = tmp_path / "lmcached.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def _lmcached(
    *args: str, timeout: float = EXIT_DEADLINE_S, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcached", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )


def _plain_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines: what a person reads."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


def _taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_start_with_the_control_port_busy_prints_a_traceback_and_hangs(tmp_path: Path) -> None:
    with _taken_port() as busy:
        cfg = _write_config(tmp_path, port=busy.getsockname()[1])
        # TCP is switched on from the environment, as an operator might.
        out = _lmcached("start", "--config", str(cfg), env={"LMCACHED_ENABLE_TCP": "true"})
    assert out.returncode != 0
    lines = _plain_lines(out.stderr)
    assert len(lines) == 1 and "cannot bind the control endpoint" in lines[0], out.stderr


def test_start_with_the_metrics_port_busy_is_one_line(tmp_path: Path) -> None:
    with _taken_port() as busy:
        cfg = _write_config(tmp_path, metrics_port=busy.getsockname()[1])
        out = _lmcached("start", "--config", str(cfg))
    assert out.returncode != 0
    lines = _plain_lines(out.stderr)
    assert len(lines) == 1 and "cannot serve metrics" in lines[0], out.stderr


def test_start_while_another_daemon_holds_the_runtime_folder_is_one_line(
    daemon_factory: Any,
) -> None:
    d = daemon_factory(metrics_port=None)
    out = _lmcached("start", "--config", str(d.config_path))
    assert out.returncode != 0
    lines = _plain_lines(out.stderr)
    assert len(lines) == 1 and "already runs" in lines[0], out.stderr


def _unstartable(tmp_path: Path) -> Path:
    """A config that passes `config check` but whose workers cannot build their disk tier."""
    (tmp_path / "a-file").write_text("not a folder")
    return _write_config(
        tmp_path,
        local_disk=str(tmp_path / "a-file" / "disk"),
        max_local_disk_size="64MiB",
        worker_restart_backoff=0.05,
    )


def _attempts(n: int) -> dict[str, str]:
    return {"LMCACHED_WORKER_START_ATTEMPTS": str(n)}


def test_a_config_that_passes_check_can_crash_loop_the_workers(tmp_path: Path) -> None:
    cfg = _unstartable(tmp_path)
    assert _lmcached("config", "check", "--config", str(cfg), env=_attempts(3)).returncode == 0
    out = _lmcached("start", "--config", str(cfg), env=_attempts(3))
    assert out.returncode != 0
    lines = _plain_lines(out.stderr)
    assert len(lines) == 1, out.stderr
    assert "failed to start 3 times" in lines[0] and "Not a directory" in lines[0], lines[0]
    # Each failed worker had created its shared-memory arena before its disk tier failed, and
    # left it in /dev/shm (only the instance's next successful start would remove it).
    tag = instance_tag(config_mod.load(cfg, environ={}).instance_dir)
    assert not glob.glob(f"/dev/shm/{ARENA_PREFIX}{tag}-*")


def test_status_and_stop_say_not_running_while_the_scheduler_lives(tmp_path: Path) -> None:
    cfg_path = _unstartable(tmp_path)
    cfg = config_mod.load(cfg_path, environ={})
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcached", "start", "--config", str(cfg_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **_attempts(10_000)},
    )
    try:
        wait_until(
            lambda: (runtime.read_endpoints(cfg) or {}).get("pid") == proc.pid,
            30,
            what="the scheduler to publish its endpoints",
        )
        status = _lmcached("status", "--config", str(cfg_path), "--json")
        assert "not running" not in status.stdout + status.stderr, status
        assert '"running": true' in status.stdout, status
        stop = _lmcached("stop", "--config", str(cfg_path))
        assert stop.returncode == 0, stop.stderr
        assert proc.wait(EXIT_DEADLINE_S) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_start_with_the_control_socket_path_taken_is_one_line(tmp_path: Path) -> None:
    cfg_path = _write_config(tmp_path)
    cfg = config_mod.load(cfg_path, environ={})
    # Something that is not a stale socket sits where the control socket goes.
    (Path(cfg.instance_dir) / "control.sock").mkdir(parents=True)
    (Path(cfg.instance_dir) / "control.sock" / "keep").write_text("x")
    out = _lmcached("start", "--config", str(cfg_path))
    assert out.returncode != 0
    lines = _plain_lines(out.stderr)
    assert len(lines) == 1 and "cannot bind the control endpoint" in lines[0], out.stderr


def test_status_of_an_endpoint_nobody_serves_ends_within_its_timeout() -> None:
    out = _lmcached(
        "status", "--endpoint", "ipc:///tmp/lmcached-nobody-here/control.sock", "--timeout", "1"
    )
    assert out.returncode == 3
    assert len(_plain_lines(out.stderr)) == 1, out.stderr
