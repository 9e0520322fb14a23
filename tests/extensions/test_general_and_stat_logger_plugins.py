"""vLLM's general and stat-logger plugins in lmcached's one registry, and AIPerf's run-time API.

General plugins run once in every daemon process (scheduler and each worker); stat loggers get
the scheduler's stats snapshot every stat_logger_interval seconds. Both are checked on a real
daemon with the example package installed; a failing one is reported and isolated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from extension_fixtures import write_distribution

from lmcached import runtime
from lmcached.extensions import registry as registry_mod
from lmcached.extensions.general import ProcessInfo, general_plugin_states, run_general_plugins
from lmcached.extensions.lifecycle import PluginStartupError
from lmcached.extensions.registry import PluginValidationError
from lmcached.extensions.stat_logger import StatLogger
from lmcached.testing import DaemonProcess, wait_until

seen_calls: list[object] = []


def no_argument_plugin() -> None:
    seen_calls.append("no argument")


def process_plugin(process: ProcessInfo) -> None:
    seen_calls.append(process)


class CountingLogger(StatLogger):
    def record(self, snapshot):
        seen_calls.append(snapshot)


class NoRecord:
    pass


# -- the registry: categories and AIPerf's run-time API -----------------------------------------


def test_register_reset_and_reverse_lookup_for_the_new_categories(registry):
    registry_mod.register("general", "counting", no_argument_plugin)
    registry_mod.register("stat_logger", "counting", CountingLogger)
    assert registry_mod.find_registered_name("general", no_argument_plugin) == "counting"
    assert registry_mod.find_registered_name("stat_logger", CountingLogger) == "counting"
    assert registry_mod.find_registered_name("stat_logger", NoRecord) is None
    assert registry.get_callable("general", "counting") is no_argument_plugin
    assert registry.get_class("stat_logger", "counting") is CountingLogger
    registry_mod.reset_registry()
    assert registry_mod.find_registered_name("general", no_argument_plugin) is None
    assert registry_mod.get_registry().names("general") == []


def test_a_stat_logger_without_record_and_a_general_plugin_that_is_no_callable_are_refused(
    registry,
):
    registry.register("stat_logger", "norecord", NoRecord)
    registry.register("general", "constant", f"{__name__}:seen_calls")
    with pytest.raises(PluginValidationError, match="missing record"):
        registry.get_class("stat_logger", "norecord")
    with pytest.raises(PluginValidationError, match="is not callable"):
        registry.get_callable("general", "constant")
    assert {i.name for i in registry.validate()} == {"norecord", "constant"}


def test_general_plugins_run_once_per_process_with_or_without_the_process_argument(registry):
    seen_calls.clear()
    registry.register("general", "plain", no_argument_plugin)
    registry.register("general", "aware", process_plugin)
    info = ProcessInfo("worker", 3, None)
    runs = run_general_plugins(info, strict=False, registry=registry)
    assert [(r.name, r.ok) for r in runs] == [("aware", True), ("plain", True)]
    assert run_general_plugins(info, strict=False, registry=registry) == runs  # once
    assert seen_calls == [info, "no argument"]
    assert general_plugin_states(registry)["aware"]["state"] == "ok"


def test_a_failing_general_plugin_is_recorded_or_fatal_when_strict(registry):
    registry.register("general", "ghost", "no_such_module_anywhere:setup")
    runs = run_general_plugins(ProcessInfo("scheduler"), strict=False, registry=registry)
    assert not runs[0].ok and "no_such_module_anywhere" in (runs[0].error or "")
    assert general_plugin_states(registry)["ghost"]["state"] == "failed"
    strict = registry_mod.reset_registry()
    strict.register("general", "ghost", "no_such_module_anywhere:setup")
    with pytest.raises(PluginStartupError, match="general plugin 'ghost'"):
        run_general_plugins(ProcessInfo("scheduler"), strict=True, registry=strict)


# -- a real daemon ----------------------------------------------------------------------------

FAILING_MODULE = """\
from lmcached.extensions.stat_logger import StatLogger


def explode():
    raise RuntimeError("general plugin says no")


class ExplodingLogger(StatLogger):
    def record(self, snapshot):
        raise ValueError("stat logger says no")
"""


@pytest.fixture
def failing_dist(tmp_path: Path) -> Path:
    """A distribution with a general plugin and a stat logger that both raise."""
    return write_distribution(
        tmp_path / "failing-site",
        "failing_plugins",
        "0.1",
        {"__init__.py": FAILING_MODULE},
        """\
        [lmcached.general_plugins]
        explode = failing_plugins:explode

        [lmcached.stat_logger_plugins]
        exploding = failing_plugins:ExplodingLogger
        """,
    )


def daemon_env(*sites: Path, markers: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join([*map(str, sites), os.getcwd()]),
        "LMCACHED_EXAMPLE_MARKER_DIR": str(markers),
    }


def jsonl_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def metrics_text(d: DaemonProcess) -> str:
    url = runtime.read_endpoints(d.cfg)["metrics"]
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        return resp.read().decode()


def test_general_plugin_runs_once_in_every_process_and_the_stat_logger_gets_snapshots(
    example_installed, tmp_path
):
    markers = tmp_path / "markers"
    markers.mkdir()
    stats_file = tmp_path / "stats.jsonl"
    with DaemonProcess(
        tmp_path / "d",
        env=daemon_env(example_installed, markers=markers),
        num_workers=2,
        stat_logger_interval=0.2,
        extra_config={"stat_logger.jsonl.path": str(stats_file)},
    ) as d:
        with d.client() as c:
            c.put([b"k/1"], [b"v"])

            def put_seen_by_3_snapshots() -> bool:
                lines = jsonl_lines(stats_file)
                seen = [
                    line
                    for line in lines
                    if any(w["cpu"]["entries"] == 1 for w in line["workers"].values())
                ]
                return len(lines) >= 3 and bool(seen)

            wait_until(put_seen_by_3_snapshots, 60, 0.1, what="3 snapshots, one after the put")
            status = c.stats()
        pids = {d.pid, *d.worker_pids()}
        metrics = metrics_text(d)
    found = sorted(p.name.rsplit("-", 1)[0] for p in markers.iterdir())
    assert found == ["scheduler-", "worker-0", "worker-1"]
    assert {int(p.stem.rsplit("-", 1)[1]) for p in markers.iterdir()} == pids
    assert status["general_plugins"]["example-marker"]["state"] == "ok"
    for w in status["workers"]:
        assert w["stats"]["general_plugins"]["example-marker"]["state"] == "ok"
    jsonl = status["stat_loggers"]["jsonl"]
    assert jsonl["state"] == "running" and jsonl["records"] >= 3 and jsonl["errors"] == 0
    assert set(jsonl_lines(stats_file)[-1]["workers"]) == {"0", "1"}
    assert 'lmcached_stat_logger_errors_total{logger="jsonl"} 0.0' in metrics
    assert (
        'lmcached_general_plugin_failed{plugin="example-marker",role="worker",worker="1"} 0.0'
        in (metrics)
    )


def test_a_failing_stat_logger_is_isolated_and_counted_and_a_failing_general_plugin_reported(
    example_installed, failing_dist, tmp_path
):
    markers = tmp_path / "markers"
    markers.mkdir()
    stats_file = tmp_path / "stats.jsonl"
    with DaemonProcess(
        tmp_path / "d",
        env=daemon_env(example_installed, failing_dist, markers=markers),
        num_workers=2,
        stat_logger_interval=0.2,
        extra_config={
            "stat_logger.jsonl.path": str(stats_file),
            "stat_logger.jsnol.path": str(stats_file),  # a typo is reported, not ignored
        },
    ) as d:
        with d.client() as c:

            def errors_counted() -> bool:
                loggers = c.stats()["stat_loggers"]
                return loggers["exploding"]["errors"] >= 3 and loggers["jsonl"]["records"] >= 3

            wait_until(errors_counted, 60, 0.2, what="3 failed and 3 recorded snapshots")
            c.put([b"k/1"], [b"v"])  # the daemon serves on
            assert c.get([b"k/1"]) == [b"v"]
            status = c.stats()
        metrics = metrics_text(d)
        shown = subprocess.run(
            [sys.executable, "-m", "lmcached", "status", "--config", str(d.config_path)],
            capture_output=True,
            text=True,
            env=d.env,
            timeout=60,
        )
        log = d.log()
    rows = [line.split(None, 5) for line in shown.stdout.splitlines()]
    assert ["sched", "exploding", "stat_logger", "running"] in [r[:4] for r in rows], shown.stdout
    assert ["sched", "explode", "general", "failed", "1"] in [r[:5] for r in rows]
    assert ["1", "explode", "general", "failed", "1"] in [r[:5] for r in rows]
    exploding = status["stat_loggers"]["exploding"]
    assert exploding["state"] == "running"
    assert exploding["last_error"] == "ValueError: stat logger says no"
    assert exploding["records"] == 0
    assert status["general_plugins"]["explode"] == {
        "class": "failing_plugins:explode",
        "package": "failing-plugins",
        "state": "failed",
        "seconds": status["general_plugins"]["explode"]["seconds"],
        "error": "RuntimeError: general plugin says no",
    }
    for w in status["workers"]:
        assert w["stats"]["general_plugins"]["explode"]["state"] == "failed"
        assert w["stats"]["general_plugins"]["example-marker"]["state"] == "ok"
    assert "general plugin failed" in log and "stat logger failed" in log
    assert "extra_config names a stat logger that is not registered" in log and "jsnol" in log
    assert log.count("stat logger says no") == 1  # the first failure is logged, then counted
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("lmcached_stat_logger_errors_total")
    ]
    assert any('logger="exploding"' in line and not line.endswith(" 0.0") for line in counted)
    assert 'lmcached_general_plugin_failed{plugin="explode",role="scheduler",worker=""} 1.0' in (
        metrics
    )


REGISTERING_MODULE = """\
from lmcached.extensions.registry import register


def register_codec(process):
    if process.role == "worker":
        register("codec", "packed", "lmcached.codecs.lossless:ZstdCodec")
"""


def test_a_general_plugin_runs_before_the_worker_builds_its_store(tmp_path):
    # The disk tier's codec exists only once the general plugin has registered it.
    site = write_distribution(
        tmp_path / "site",
        "registering_plugins",
        "0.1",
        {"__init__.py": REGISTERING_MODULE},
        "[lmcached.general_plugins]\npacked = registering_plugins:register_codec\n",
    )
    with (
        DaemonProcess(
            tmp_path / "d",
            env=daemon_env(site, markers=tmp_path),
            local_disk=str(tmp_path / "disk"),
            max_local_disk_size="64MiB",
            disk_codec="packed",
        ) as d,
        d.client() as c,
    ):
        c.put([b"k/packed"], [b"x" * 4096])
        c.flush()
        assert bytes(c.get([b"k/packed"])[0]) == b"x" * 4096
        assert "disk" in c.stats()["totals"]


def test_strict_plugins_makes_a_failing_general_plugin_fatal(failing_dist, tmp_path):
    d = DaemonProcess(
        tmp_path / "d",
        env=daemon_env(failing_dist, markers=tmp_path),
        strict_plugins=True,
    )
    try:
        with pytest.raises(RuntimeError, match="exited with 78"):
            d.start()
        assert "general plugin 'explode'" in d.log()
    finally:
        d.close()


def test_lmcached_plugins_lists_the_general_and_stat_logger_categories(example_installed, run_cli):
    out = run_cli(pythonpath=[example_installed])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "general [OTHER]" in text and "stat_logger [OTHER]" in text
    assert "lmcached_example_plugins.general:write_marker" in text
    assert "lmcached_example_plugins.stat_logger:JsonlStatLogger" in text
    shown = run_cli("stat_logger", "jsonl", "--json", pythonpath=[example_installed])
    data = json.loads(shown.stdout)
    assert data["package"] == "lmcached-example-plugins"
    assert data["source"] == "entry point lmcached.stat_logger_plugins"
    valid = run_cli("--validate", pythonpath=[example_installed])
    assert valid.returncode == 0, valid.stdout + valid.stderr
