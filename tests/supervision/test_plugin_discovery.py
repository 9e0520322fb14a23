"""Which files are plugins, which process runs each, with what interpreter, and from where."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from plugin_helpers import PluginDir, world_writable

from lmcached.config import from_mapping
from lmcached.errors import ConfigError
from lmcached.supervision.discovery import (
    SCHEDULER,
    WORKER,
    InterpreterError,
    check_plugin_locations,
    interpreter_command,
    scan,
    target_for,
)


def runs_on(name: str, workers: int = 3) -> set[str]:
    t = target_for(name)
    out = {"scheduler"} if t.selects(SCHEDULER, -1) else set()
    out |= {f"worker{i}" for i in range(workers) if t.selects(WORKER, i)}
    return out


ALL = {"scheduler", "worker0", "worker1", "worker2"}
WORKERS = {"worker0", "worker1", "worker2"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("scheduler_metrics.py", {"scheduler"}),
        ("SCHEDULER_metrics.sh", {"scheduler"}),
        ("scheduler.py", {"scheduler"}),
        ("worker_logcollector.py", WORKERS),
        ("Worker_health.sh", WORKERS),
        ("worker.py", WORKERS),
        ("worker_1_warmup.py", {"worker1"}),
        ("WORKER_2_x.sh", {"worker2"}),
        ("worker_0.py", {"worker0"}),
        ("worker_7_ghost.py", set()),
        ("worker_x1_y.py", WORKERS),
        ("all_heartbeat.sh", ALL),
        ("ALL_monitor.py", ALL),
        ("monitor.py", ALL),
        ("my_plugin.sh", ALL),
        ("workers_thing.py", ALL),
        ("noext", ALL),
    ],
)
def test_filename_selects_processes(name: str, expected: set[str]) -> None:
    assert runs_on(name) == expected


def test_scan_takes_plugins_and_skips_the_rest(plugin_dir: PluginDir, tmp_path: Path) -> None:
    d = plugin_dir
    d.write("b_plugin.sh", "echo b\n")
    d.write("a_plugin.py", "print('a')\n")
    d.write("shebang_only", "#!/bin/sh\necho s\n")
    d.write("notes.txt", "not a plugin\n")
    d.write(".hidden.sh", "echo hidden\n")
    d.write("backup.sh~", "echo backup\n")
    d.write("swap.sh.swp", "echo swap\n")
    (d.path / "__pycache__").mkdir()
    (d.path / "helpers").mkdir()
    (d.path / "helpers" / "lib.py").write_text("x = 1\n")
    (d.path / "subdir.sh").mkdir()
    os.mkfifo(d.path / "fifo.sh")
    os.symlink(d.path / "a_plugin.py", d.path / "z_same_as_a.py")
    other = PluginDir(tmp_path / "other")
    other.write("b_plugin.sh", "echo other b\n")

    result = scan(
        [str(d.path), str(d.path / "a_plugin.py"), str(tmp_path / "missing"), str(other.path)]
    )

    assert [p.name for p in result.plugins] == ["a_plugin.py", "b_plugin.sh", "shebang_only"]
    assert result.plugins[0].path == os.path.realpath(d.path / "a_plugin.py")
    assert any("missing" in w and "does not exist" in w for w in result.warnings)
    assert any("already found" in w for w in result.warnings), result.warnings
    assert not result.errors
    skipped = "\n".join(result.debug)
    for name in ("notes.txt", ".hidden.sh", "backup.sh~", "swap.sh.swp", "fifo.sh", "subdir.sh"):
        assert name in skipped, (name, skipped)
    assert "z_same_as_a.py" in skipped and "launched once" in skipped


def test_changed_content_changes_the_fingerprint(plugin_dir: PluginDir) -> None:
    plugin_dir.write("p.sh", "echo 1\n")
    before = scan([str(plugin_dir.path)]).plugins[0].fingerprint
    plugin_dir.write("p.sh", "echo 2\n")
    assert scan([str(plugin_dir.path)]).plugins[0].fingerprint != before


def test_shebang_env_with_arguments_is_split(plugin_dir: PluginDir) -> None:
    p = plugin_dir.write("a.py", "#!/usr/bin/env python3 -u\nprint(1)\n")
    assert interpreter_command(str(p)) == ["/usr/bin/env", "python3", "-u", str(p)]


def test_shebang_absolute_interpreter_and_crlf(plugin_dir: PluginDir) -> None:
    p = plugin_dir.write("a.sh", "#!/bin/sh -e\r\necho 1\n")
    assert interpreter_command(str(p)) == ["/bin/sh", "-e", str(p)]


def test_no_shebang_uses_extension(plugin_dir: PluginDir) -> None:
    py = plugin_dir.write("a.py", "print(1)\n")
    sh = plugin_dir.write("b.sh", "echo 1\n")
    assert interpreter_command(str(py)) == [sys.executable, str(py)]
    assert interpreter_command(str(sh)) == [shutil.which("bash"), str(sh)]


@pytest.mark.parametrize(
    ("shebang", "message"),
    [
        ("#!/nonexistent/python9\n", "'/nonexistent/python9' not found"),
        ("#!/usr/bin/env no-such-interpreter-xyz\n", "'no-such-interpreter-xyz' (via"),
        ("#!python3\n", "not an absolute path"),
        ("#!\n", "empty shebang"),
    ],
)
def test_bad_interpreter_is_a_clear_error(plugin_dir: PluginDir, shebang: str, message: str):
    p = plugin_dir.write("bad.py", shebang + "print(1)\n")
    with pytest.raises(InterpreterError, match=re.escape(message)):
        interpreter_command(str(p))


def test_world_writable_location_is_refused_by_scan(plugin_dir: PluginDir) -> None:
    plugin_dir.write("a.sh", "echo a\n")
    world_writable(plugin_dir.path)
    result = scan([str(plugin_dir.path)])
    assert result.plugins == []
    assert "world-writable" in result.errors[0]
    assert [p.name for p in scan([str(plugin_dir.path)], allow_insecure=True).plugins] == ["a.sh"]


def test_world_writable_plugin_file_is_refused(plugin_dir: PluginDir) -> None:
    world_writable(plugin_dir.write("a.sh", "echo a\n"))
    plugin_dir.write("b.sh", "echo b\n")
    result = scan([str(plugin_dir.path)])
    assert [p.name for p in result.plugins] == ["b.sh"]
    assert "a.sh" in result.errors[0] and "world-writable" in result.errors[0]


def test_world_writable_location_fails_the_location_check(plugin_dir: PluginDir) -> None:
    world_writable(plugin_dir.path)
    with pytest.raises(ConfigError, match=r"world-writable.*allow_insecure_plugin_locations"):
        check_plugin_locations(
            from_mapping({"plugin_locations": [str(plugin_dir.path)]}, environ={})
        )
    cfg = from_mapping(
        {"plugin_locations": [str(plugin_dir.path)], "allow_insecure_plugin_locations": True},
        environ={},
    )
    check_plugin_locations(cfg)
    assert cfg.plugin_locations == [str(plugin_dir.path)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")
def test_location_owned_by_another_user_is_refused(plugin_dir: PluginDir) -> None:
    os.chown(plugin_dir.path, 4242, 4242)
    result = scan([str(plugin_dir.path)])
    assert "owned by uid 4242" in result.errors[0]


def test_plugin_config_keys_and_alias() -> None:
    cfg = from_mapping(
        {
            "runtime_plugin_locations": "/nonexistent/plugins",
            "plugin_config": {
                "a.py": {"restart": "On-Failure", "rlimits": {"memory": "256MiB"}, "settings": {}}
            },
        },
        environ={},
    )
    assert cfg.plugin_locations == ["/nonexistent/plugins"]
    assert cfg.plugin_config["a.py"]["restart"] == "on-failure"
    assert cfg.plugin_config["a.py"]["rlimits"]["memory"] == 256 << 20
    with pytest.raises(ConfigError, match="unknown setting 'restrat' \\(did you mean 'restart'"):
        from_mapping({"plugin_config": {"a.py": {"restrat": "always"}}}, environ={})
    with pytest.raises(ConfigError, match="restart: expected one of never, on-failure, always"):
        from_mapping({"plugin_config": {"a.py": {"restart": "sometimes"}}}, environ={})
    with pytest.raises(ConfigError, match="unknown rlimit 'stack'"):
        from_mapping({"plugin_config": {"a.py": {"rlimits": {"stack": 1}}}}, environ={})
