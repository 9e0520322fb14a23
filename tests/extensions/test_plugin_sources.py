"""Entry-point discovery of an installed package, the LMCACHED_PLUGINS allow-list, and
per-process idempotent loading."""

from __future__ import annotations

import multiprocessing
import os

from lmcached.extensions import sources
from lmcached.extensions.registry import get_registry

# The example package's entry points: two in lmcached.plugins, one general plugin, one stat logger.
EXAMPLE_ENTRY_POINTS = ["example-manifest", "example-marker", "example-register", "jsonl"]


def test_installed_package_is_discovered_through_its_entry_points(example_installed):
    report = sources.load()
    assert sorted(report.loaded) == EXAMPLE_ENTRY_POINTS
    reg = get_registry()
    # From the YAML manifest (AIPerf style) ...
    sqlite = reg.get_entry("storage_backend", "sqlite")
    assert sqlite.package == "lmcached-example-plugins" and not sqlite.builtin
    assert sqlite.source == "lmcached_example_plugins:plugins.yaml"
    # ... and from the register function (vLLM style), credited to the same distribution.
    folder = reg.get_entry("remote_connector", "folder")
    assert folder.package == "lmcached-example-plugins"
    assert reg.validate() == []
    pkgs = {p["package"]: p for p in reg.packages()}
    assert pkgs["lmcached-example-plugins"]["version"] == "0.1.0"
    assert pkgs["lmcached-example-plugins"]["entries"] == 6


def test_entries_are_not_imported_by_discovery(example_installed):
    sources.load()
    assert "lmcached_example_plugins.sqlite_backend" not in os.sys.modules
    cls = get_registry().get_class("codec", "zlib")
    assert cls.__module__ == "lmcached_example_plugins.zlib_codec"


def test_allow_list_limits_which_entry_points_load(example_installed, monkeypatch):
    monkeypatch.setenv("LMCACHED_PLUGINS", "example-register")
    report = sources.load()
    assert report.loaded == ["example-register"]
    assert sorted(report.skipped) == ["example-manifest", "example-marker", "jsonl"]
    reg = get_registry()
    assert reg.has("remote_connector", "folder")
    assert not reg.has("codec", "zlib")


def test_allow_list_accepts_distribution_names_and_empty_means_none(example_installed):
    assert sources.allowed_plugins({}) is None
    assert sources.allowed_plugins({"LMCACHED_PLUGINS": ""}) == set()
    report = sources.load_entry_points(
        get_registry(), environ={"LMCACHED_PLUGINS": "lmcached-example-plugins"}
    )
    assert sorted(report.loaded) == EXAMPLE_ENTRY_POINTS
    report = sources.load_entry_points(get_registry(), environ={"LMCACHED_PLUGINS": " "})
    assert report.loaded == [] and len(report.skipped) == 4


def test_loading_is_idempotent_within_a_process(example_installed):
    first = sources.load()
    second = sources.load()
    assert second is first
    assert get_registry().shadowed("codec", "zlib") == []


def _child_load(queue):
    report = sources.load()
    queue.put((report.pid, os.getpid(), sorted(report.loaded)))


def test_a_forked_child_loads_its_own(example_installed):
    parent = sources.load()
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_load, args=(queue,))
    child.start()
    try:
        report_pid, child_pid, loaded = queue.get(timeout=30)
    finally:
        child.join(timeout=30)
    assert report_pid == child_pid != parent.pid
    assert loaded == EXAMPLE_ENTRY_POINTS


def test_a_broken_package_is_reported_and_the_others_load(
    example_installed, broken_dist, monkeypatch
):
    monkeypatch.syspath_prepend(str(broken_dist))
    report = sources.load()
    assert "broken" in report.loaded  # the manifest itself is well-formed
    issues = {i.name: i.error for i in get_registry().validate()}
    assert set(issues) == {"ghost", "halfdone"}
    assert "broken_plugins.nowhere" in issues["ghost"]
    assert "missing decode" in issues["halfdone"]
