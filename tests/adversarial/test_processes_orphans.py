"""No survivors: kill -9 of one lmcached process leaves nothing it started running."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

from lmcached.testing import wait_until


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_worker_is_orphaned_by_kill_9_of_the_scheduler_right_after_a_respawn(
    daemon_factory: Any,
) -> None:
    rng = random.Random(12)
    for _ in range(3):
        d = daemon_factory(num_workers=2, worker_restart_backoff=0.05, metrics_port=None)
        assert d.proc is not None
        scheduler = d.proc.pid
        before = set(d.worker_pids())
        assert len(before) == 2
        os.kill(min(before), signal.SIGKILL)
        # The respawned worker shows up as soon as it has exec'd: the window the old code lost.
        wait_until(
            lambda d=d, before=before: bool(set(d.worker_pids()) - before),
            30,
            interval=0.002,
            what="the worker to be respawned",
        )
        time.sleep(rng.uniform(0.0, 0.1))
        workers = [p.pid for p in psutil.Process(scheduler).children(recursive=True)]
        os.kill(scheduler, signal.SIGKILL)
        d.proc.wait()
        try:
            wait_until(
                lambda workers=workers: not any(_alive(p) for p in workers),
                15,
                what="every worker to die with the scheduler",
            )
        finally:
            _kill(workers)  # never leave one behind, even when the test fails


PLUGIN = textwrap.dedent(
    """\
    #!/bin/bash
    sleep 1000 &
    setsid sleep 1001 &
    echo started > "$PLUGIN_OUT/started"
    while true; do sleep 1; done
    """
)


def _marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get("PLUGIN_TEST_MARKER") == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_a_setsid_grandchild_of_a_plugin_survives_kill_9_of_its_shim(
    daemon_factory: Any, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    plugins = tmp_path / "plugins"
    plugins.mkdir(mode=0o755)
    out = tmp_path / "out"
    out.mkdir()
    script = plugins / "scheduler_tree.sh"
    script.write_text(PLUGIN)
    script.chmod(0o755)
    d = daemon_factory(
        plugin_locations=[str(plugins)],
        plugin_stop_timeout=1.0,
        metrics_port=None,
        env={"PLUGIN_TEST_MARKER": marker, "PLUGIN_OUT": str(out)},
    )
    try:
        wait_until((out / "started").exists, 30, what="the plugin to start")
        wait_until(
            lambda: any(_cmd(p) == "sleep 1001" for p in _marked(marker)),
            30,
            what="the setsid grandchild",
        )
        grandchild = next(p.pid for p in _marked(marker) if _cmd(p) == "sleep 1001")
        shim = next(p.pid for p in _marked(marker) if "shim.py" in _cmd(p))
        assert os.getsid(grandchild) == grandchild  # it did leave the plugin's session
        os.kill(shim, signal.SIGKILL)
        wait_until(
            lambda: not _alive(grandchild),
            20,
            what="the dead shim's setsid grandchild to be killed",
        )
        assert d.proc is not None and d.proc.poll() is None  # the daemon lives on
        d.stop()
        wait_until(lambda: not _marked(marker), 20, what="no plugin process after a clean stop")
    finally:
        _kill([p.pid for p in _marked(marker)])
