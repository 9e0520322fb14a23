"""Helpers shared by the script-plugin tests (imported by name: tests/supervision is on sys.path)."""

from __future__ import annotations

import os
import stat
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import structlog
from structlog.testing import CapturingLogger

from lmcached.supervision.launcher import PluginLauncher
from lmcached.testing import wait_until


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    return wait_until(predicate, timeout, what=what)


class LogCapture:
    """A real structlog logger whose events are kept in memory for assertions."""

    def __init__(self) -> None:
        self.sink = CapturingLogger()
        self.logger = structlog.wrap_logger(self.sink, processors=[])

    def events(self, plugin: str | None = None) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for call in list(self.sink.calls):
            if plugin is None or call.kwargs.get("plugin") == plugin:
                out.append((call.method_name, call.kwargs))
        return out

    def output(self, plugin: str, stream: str | None = None) -> list[tuple[str, str]]:
        """Return (level, event) of the plugin's captured output lines."""
        return [
            (level, kw["event"])
            for level, kw in self.events(plugin)
            if "stream" in kw and (stream is None or kw["stream"] == stream)
        ]


class PluginDir:
    """A plugin folder with mode 0755 in which tests write plugin files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)

    def write(self, name: str, body: str, *, executable: bool = False) -> Path:
        p = self.path / name
        p.write_text(textwrap.dedent(body).lstrip("\n"))
        mode = 0o755 if executable else 0o644
        p.chmod(mode)
        return p


def processes_with_marker(marker: str) -> list[psutil.Process]:
    """Return live processes whose command line or environment carries ``marker``."""
    found = []
    me = os.getpid()  # the test process carries the marker in os.environ itself
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if marker in cmdline or proc.environ().get("PLUGIN_TEST_MARKER") == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def states(pl: PluginLauncher) -> dict[str, str]:
    return {s["name"]: s["state"] for s in pl.status()}


def plugin_status(pl: PluginLauncher, name: str) -> dict[str, Any]:
    for s in pl.status():
        if s["name"] == name:
            return s
    raise AssertionError(f"no plugin {name} in status {pl.status()}")


def world_writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWOTH)
