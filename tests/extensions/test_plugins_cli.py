"""`lmcached plugins` as a real subprocess: listing, details, packages, validation, JSON."""

from __future__ import annotations

import json


def test_lists_every_category_as_a_table(run_cli, example_target):
    res = run_cli(pythonpath=[example_target])
    assert res.returncode == 0, res.stderr
    for header in ("storage_backend [KV_CACHE]", "remote_connector", "codec", "eviction_policy"):
        assert header in res.stdout
    assert "s3fifo" in res.stdout and "sqlite" in res.stdout
    assert "SCHEME" in res.stdout  # connectors are keyed by URL scheme
    assert "folder" in res.stdout


def test_one_category_and_json(run_cli, example_target):
    res = run_cli("codec", "--json", pythonpath=[example_target])
    data = json.loads(res.stdout)
    assert list(data) == ["codec"]
    assert {e["name"] for e in data["codec"]} == {"int8", "lz4", "none", "zstd", "zlib"}
    zlib = next(e for e in data["codec"] if e["name"] == "zlib")
    assert zlib["package"] == "lmcached-example-plugins" and zlib["builtin"] is False


def test_entry_details_show_class_package_priority_metadata_and_shadowed(
    run_cli, example_target, tmp_path
):
    # The config's connector (priority 100) shadows the package's folder connector (0).
    cfg = tmp_path / "lmcached.yaml"
    cfg.write_text(
        "extra_config:\n"
        "  external_connector.folder.module_path: lmcached_example_plugins.folder_connector\n"
        "  external_connector.folder.class_name: FolderConnector\n"
    )
    res = run_cli("remote_connector", "folder", "--config", str(cfg), pythonpath=[example_target])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "remote_connector:folder" in out
    assert "package:     config (external)" in out
    assert "priority:    100" in out
    assert "shadowed (reachable by class path):" in out
    assert "(package lmcached-example-plugins, priority 0)" in out
    res = run_cli("codec", "int8", "--json")
    data = json.loads(res.stdout)
    assert data["class"] == "lmcached.codecs.int8:Int8Codec"
    assert data["metadata"]["lossless"] is False and data["shadowed"] == []
    assert data["interface"] == "lmcached.codecs.base:Codec"


def test_packages_lists_versions(run_cli, example_target):
    res = run_cli("--packages", pythonpath=[example_target])
    assert res.returncode == 0
    line = next(x for x in res.stdout.splitlines() if "lmcached-example-plugins" in x)
    assert "0.1.0" in line.split()
    data = json.loads(run_cli("--packages", "--json", pythonpath=[example_target]).stdout)
    assert data[0]["package"] == "lmcached"


def test_validate_passes_on_healthy_entries(run_cli, example_target):
    res = run_cli("--validate", pythonpath=[example_target])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "entries ok" in res.stdout


def test_validate_names_a_bad_class_path_and_a_missing_method(run_cli, example_target, broken_dist):
    res = run_cli("--validate", pythonpath=[example_target, broken_dist])
    assert res.returncode == 1
    broken = [line for line in res.stdout.splitlines() if line.startswith("BROKEN")]
    assert len(broken) == 2
    assert any(
        "codec:ghost" in b and "No module named 'broken_plugins.nowhere'" in b for b in broken
    )
    assert any("codec:halfdone" in b and "missing decode" in b for b in broken)
    assert "ok      eviction_policy:fine" in res.stdout
    data = json.loads(run_cli("--validate", "--json", pythonpath=[broken_dist]).stdout)
    assert data["ok"] is False and {i["name"] for i in data["issues"]} == {"ghost", "halfdone"}


def test_allow_list_hides_packages_from_the_cli(run_cli, example_target, broken_dist):
    res = run_cli(
        "--validate",
        pythonpath=[example_target, broken_dist],
        env={"LMCACHED_PLUGINS": "example-manifest,example-register"},
    )
    assert res.returncode == 0, res.stdout
    data = json.loads(
        run_cli(
            "--validate",
            "--json",
            pythonpath=[broken_dist],
            env={"LMCACHED_PLUGINS": "example-manifest"},
        ).stdout
    )
    assert data["ok"] is True and data["skipped_by_allow_list"] == ["broken"]


def test_unknown_category_or_name_is_a_usage_error(run_cli):
    res = run_cli("transport")
    assert res.returncode == 2 and "unknown category 'transport'" in res.stderr
    res = run_cli("codec", "brotli")
    assert res.returncode == 2 and "codec:brotli: not registered" in res.stderr
