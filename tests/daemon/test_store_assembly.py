"""Assembling a worker's store: the registry checks, the tier codecs, and a config refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmcached import config as config_mod
from lmcached.daemon.assembly import apply_tier_codecs, check_store_config, plan_store
from lmcached.errors import EXIT_CONFIG_INVALID, ConfigError
from lmcached.storage.cpu import CPUBackend

MISSING_BACKEND = {
    "external_backends": ["gone"],
    "extra_config": {
        "external_backend.gone.module_path": "no_such_module",
        "external_backend.gone.class_name": "Backend",
    },
}


def load(**data: object) -> config_mod.Config:
    return config_mod.from_mapping(data, environ={})


def test_unknown_eviction_policy_is_named_by_the_store_check(registry):
    cfg = load(eviction_policy="fifo9")  # a name: only the registry knows whether it exists
    with pytest.raises(ConfigError) as err:
        check_store_config(cfg)
    assert err.value.key == "eviction_policy"
    assert "unknown policy 'fifo9'; known: lru, s3fifo" in str(err.value)
    assert "\n" not in str(err.value)


def test_an_eviction_policy_may_be_named_by_its_class_path(registry):
    check_store_config(load(eviction_policy="lmcached.storage.eviction:LRUPolicy"))
    with pytest.raises(ConfigError, match="cannot import no_such_module:Policy"):
        check_store_config(load(eviction_policy="no_such_module:Policy"))


def test_apply_tier_codecs_wraps_the_disk_and_remote_tiers_only(registry):
    plan = plan_store(load(disk_codec="zstd", remote_serde="lz4"))
    cpu, disk, remote = CPUBackend(100), CPUBackend(100), CPUBackend(100)
    disk.name, remote.name = "disk", "remote"
    out = apply_tier_codecs(plan, [cpu, disk, remote])
    assert out[0] is cpu
    assert isinstance(out[1], type(out[2])) and out[1].codec == "zstd" and out[1].name == "disk"
    assert out[2].codec == "lz4"
    assert out[1].capacity == 100  # tier attributes stay reachable through the wrapper
    assert apply_tier_codecs(plan_store(load()), [cpu, disk])[1] is disk


def test_config_load_alone_imports_no_plugin_and_no_store(tmp_path):
    path = tmp_path / "lmcached.yaml"
    path.write_text(yaml.safe_dump({**MISSING_BACKEND, "eviction_policy": "s3fifo"}))
    code = (
        "import sys; from lmcached import config; config.load(sys.argv[1], environ={}); "
        "print([m for m in sys.modules if m.startswith(('lmcached.storage', 'lmcached.codecs', "
        "'lmcached.extensions', 'lmcached.supervision'))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_config_check_names_a_missing_backend_module_in_one_line(tmp_path):
    path = tmp_path / "lmcached.yaml"
    path.write_text(yaml.safe_dump(MISSING_BACKEND))
    out = subprocess.run(
        [sys.executable, "-m", "lmcached", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("lmcached: config error:")
    assert "external_backends (gone)" in line and "No module named 'no_such_module'" in line


def test_a_worker_refusing_the_config_stops_the_daemon_without_restarts(daemon_factory):
    d = daemon_factory(start=False, num_workers=2, **MISSING_BACKEND)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "lmcached", "start", "--config", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=d.env,
    )
    assert time.monotonic() - started < 20  # promptly: no backoff, no start timeout
    assert run.returncode == EXIT_CONFIG_INVALID, run.stderr
    records = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    refused = [r for r in records if r.get("event") == "config_invalid"]
    assert refused and "No module named 'no_such_module'" in refused[0]["error"]
    (stopped,) = [r for r in records if r.get("event") == "worker_config_invalid"][:1]
    assert f"lmcached config check --config {d.config_path}" in stopped["hint"]
    assert f"worker {stopped['worker']} refused the config" in stopped["hint"]
    # Never a crash loop: each worker was spawned once.
    spawned = [r for r in records if r.get("event") == "worker_spawned"]
    assert len(spawned) == 2, [r.get("event") for r in records]
    assert not Path(d.cfg.instance_dir, "endpoints.json").exists()
