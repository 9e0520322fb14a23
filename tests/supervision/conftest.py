"""Fixtures for the script-plugin tests: plugin folders, configs and launchers.

Every launcher made through the ``launcher`` factory is stopped at teardown, and the teardown then
checks that no process started by the test (found by its marker in the environment or the command
line) is left.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from plugin_helpers import LogCapture, PluginDir, processes_with_marker, wait_for

from lmcached.config import Config, from_mapping
from lmcached.supervision.launcher import PluginLauncher


@pytest.fixture
def marker() -> str:
    """A unique word that the test's plugins carry in their environment, to find their processes."""
    return f"lmcplug{uuid.uuid4().hex[:12]}"


@pytest.fixture
def plugin_dir(tmp_path: Path) -> PluginDir:
    tmp_path.chmod(0o755)
    return PluginDir(tmp_path / "plugins")


@pytest.fixture
def make_config(plugin_dir: PluginDir) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        data: dict[str, Any] = {
            "plugin_locations": [str(plugin_dir.path)],
            "plugin_stop_timeout": 2.0,
            "num_workers": 3,
        }
        data.update(overrides)
        return from_mapping(data, environ={})

    return make


@pytest.fixture
def launcher(
    make_config: Callable[..., Config], marker: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[..., tuple[PluginLauncher, LogCapture]]]:
    """Build PluginLaunchers (stopped at teardown); plugins see PLUGIN_TEST_MARKER, PLUGIN_OUT."""
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("PLUGIN_TEST_MARKER", marker)
    monkeypatch.setenv("PLUGIN_OUT", str(out))
    made: list[PluginLauncher] = []

    def make(
        role: str = "worker", worker_id: int = 0, cfg: Config | None = None, **overrides: Any
    ) -> tuple[PluginLauncher, LogCapture]:
        logs = LogCapture()
        pl = PluginLauncher(
            cfg or make_config(**overrides),
            role,
            worker_id,
            control_endpoint="tcp://127.0.0.1:7470",
            logger=logs.logger,
        )
        made.append(pl)
        return pl, logs

    yield make
    for pl in made:
        pl.stop()
    wait_for(lambda: not processes_with_marker(marker), 10, "no plugin process left")
