"""The command line's habits, each through the real `lmcached` CLI against a real daemon.

`stop` waits for the exit, a second `start` prints one line, a closed pipe is not an error,
`-c`/`LMCACHED_CONFIG` everywhere, `--json` on every command that prints a result, `status`
exits non-zero when unhealthy, `check` refuses a missing folder, and `plugins --validate`
imports each entry's libraries.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcached import runtime
from lmcached.cli.main import build_parser
from lmcached.testing import DaemonProcess, wait_until

# Generous: two loaded cores, and a daemon's shutdown waits for its workers.
CLI_TIMEOUT_S = 90


def lmcached(
    *args: str, env: dict[str, str] | None = None, stdout: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m lmcached ARGS` and return its result (text, both streams captured)."""
    return subprocess.run(
        [sys.executable, "-m", "lmcached", *args],
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path / "d", num_workers=2) as d:
        yield d


def test_stop_waits_for_the_exit_so_stop_and_start_loop_five_times(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path / "d", num_workers=2)
    cfg = str(d.config_path)
    log = (tmp_path / "daemon.log").open("ab")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(5):
            proc = subprocess.Popen(
                [sys.executable, "-m", "lmcached", "start", "-c", cfg],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            started = proc

            def serving(p: subprocess.Popen[bytes] = started) -> bool:
                assert p.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
                data = runtime.read_endpoints(d.cfg)
                return data is not None and data.get("pid") == p.pid

            wait_until(serving, 60, what="the daemon to serve")
            stopped = lmcached("stop", "-c", cfg)
            assert stopped.returncode == 0, stopped.stderr
            assert "stopped" in stopped.stdout
            # stop returned: the daemon has exited (a zombie until reaped here), nothing is left
            # that the next start would trip over.
            assert proc.poll() == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        d.close()


def test_stop_no_wait_returns_once_requested(daemon: DaemonProcess) -> None:
    result = lmcached("stop", "-c", str(daemon.config_path), "--no-wait", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc == {"pid": daemon.pid, "shutdown_requested": True, "exited": None}
    assert daemon.proc is not None
    assert daemon.proc.wait(CLI_TIMEOUT_S) == 0


def test_second_start_prints_the_message_alone(daemon: DaemonProcess) -> None:
    result = lmcached("start", "-c", str(daemon.config_path))
    assert result.returncode == 1
    line = one_line_error(result)
    assert "already runs" in line and str(daemon.pid) in line
    # The first daemon kept its instance folder and still serves.
    assert lmcached("status", "-c", str(daemon.config_path)).returncode == 0


@pytest.mark.parametrize("command", [["plugins", "--json"], ["config", "example"]])
def test_closed_pipe_is_not_a_traceback(command: list[str]) -> None:
    # A reader that is already gone, as `| head` is after its lines: every write gets EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = lmcached(*command, stdout=write_end)
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert result.returncode == 141, result.stderr


def config_options() -> dict[str, list[str]]:
    """Return, for every command (`config check` ...) that takes a config, its option strings."""
    found: dict[str, list[str]] = {}

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif "--config" in action.option_strings:
                found[" ".join(path)] = list(action.option_strings)

    walk(build_parser(), [])
    return found


def test_short_config_flag_is_accepted_by_every_command_that_reads_a_config() -> None:
    options = config_options()
    assert {"start", "stop", "status", "check", "plugins", "config check"} <= set(options)
    assert all("-c" in strings for strings in options.values()), options


def test_config_env_names_the_file_of_every_command(daemon: DaemonProcess) -> None:
    env = {"LMCACHED_CONFIG": str(daemon.config_path)}
    shown = lmcached("config", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["runtime_dir"] == daemon.cfg.runtime_dir
    status = lmcached("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == daemon.pid
    # A flag given on the command line wins over the environment.
    other = daemon.workdir / "other.yaml"
    other.write_text("num_workers: 3\n")
    flagged = lmcached("config", "show", "--json", "-c", str(other), env=env)
    assert json.loads(flagged.stdout)["num_workers"] == 3


def test_json_on_every_command_that_prints_a_result(daemon: DaemonProcess, tmp_path: Path) -> None:
    cfg = str(daemon.config_path)
    with daemon.client() as client:
        client.put([b"p/1", b"p/2", b"q/1"], [b"x" * 100] * 3)
    purged = lmcached("purge", "--prefix", "p/", "-c", cfg, "--json")
    assert json.loads(purged.stdout) == {"prefix": "p/", "purged": 2}
    checked = lmcached("config", "check", "-c", cfg, "--json")
    assert json.loads(checked.stdout)["ok"] is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_workers: zero\n")
    refused = lmcached("config", "check", "-c", str(bad), "--json")
    assert refused.returncode == 2
    doc = json.loads(refused.stdout)
    assert doc["ok"] is False and "num_workers" in doc["errors"][0]
    keys = lmcached("keygen", str(tmp_path / "keys"), "engine", "--json")
    assert keys.returncode == 0, keys.stderr
    pair = json.loads(keys.stdout)
    assert Path(pair["public"]).is_file() and Path(pair["secret"]).is_file()
    stopped = lmcached("stop", "-c", cfg, "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout) == {
        "pid": daemon.pid,
        "shutdown_requested": True,
        "exited": True,
    }


def test_status_exits_nonzero_while_unhealthy(daemon: DaemonProcess) -> None:
    cfg = str(daemon.config_path)
    assert lmcached("status", "-c", cfg).returncode == 0
    worker = daemon.worker_pids()[0]
    os.kill(worker, signal.SIGSTOP)  # alive, but answers nothing: a wedged worker
    try:
        result = lmcached("status", "-c", cfg, "--timeout", "30")
        assert "health: UNHEALTHY" in result.stdout, result.stdout + result.stderr
        assert result.returncode == 1
        doc = json.loads(lmcached("status", "-c", cfg, "--json", "--timeout", "30").stdout)
        assert doc["problems"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGCONT)
    wait_until(
        lambda: lmcached("status", "-c", cfg).returncode == 0, 60, what="health to come back"
    )


def test_check_refuses_a_disk_folder_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"local_disk: {missing}\nmax_local_disk_size: 1\n")
    result = lmcached("check", "-c", str(cfg))
    assert result.returncode == 2
    assert str(missing) in one_line_error(result)
    assert "0 problems" not in result.stdout
    assert not missing.exists()  # checking does not create it


def test_plugins_validate_imports_the_libraries_an_entry_needs(tmp_path: Path) -> None:
    # zstandard and lz4 made unimportable for the child only, as in an install without them.
    blocked = tmp_path / "blocked"
    (blocked / "lz4").mkdir(parents=True)
    for module in (blocked / "zstandard.py", blocked / "lz4" / "__init__.py"):
        module.write_text("raise ImportError('not installed (blocked by the test)')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked), *sys.path])}
    result = lmcached("plugins", "codec", "--validate", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [line for line in result.stdout.splitlines() if line.startswith("BROKEN")]
    assert any("codec:zstd" in line and "zstandard" in line for line in broken), result.stdout
    assert any("codec:lz4" in line and "lz4" in line for line in broken), result.stdout
    assert any(
        line.startswith("ok") and "codec:none" in line for line in result.stdout.splitlines()
    )
    # With the libraries importable the same entries are ok.
    assert lmcached("plugins", "codec", "--validate").returncode == 0
