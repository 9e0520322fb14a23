"""`lmcached config check` reports per-key and cross-key problems together, in one run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = str(Path(__file__).resolve().parents[2])


def _config_check(
    config: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "LMCACHED_"))}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, clean.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "lmcached", "config", "check", "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def _errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if "config error" in line]


def test_cross_key_problems_are_reported_with_per_key_ones(tmp_path: Path) -> None:
    config = tmp_path / "two-kinds.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "num_workers": "many",  # per key
                "local_disk": str(tmp_path / "disk"),  # cross key: no disk budget
                "max_block_size": "64MiB",  # cross key: larger than one request
                "max_inflight_bytes": "1MiB",
            }
        )
    )
    done = _config_check(config, env={"LMCACHED_PORT": "not-a-port"})
    assert done.returncode == 2
    errors = _errors(done)
    assert len(errors) == 4, done.stderr
    assert any(f"{config}: num_workers: expected a positive integer" in e for e in errors)
    assert any("env LMCACHED_PORT: port: expected a port" in e for e in errors)
    assert any("max_local_disk_size: local_disk is set" in e for e in errors)
    assert any("max_block_size: 67108864 bytes exceeds max_inflight_bytes" in e for e in errors)
    assert "Traceback" not in done.stderr


def test_every_cross_key_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    config = tmp_path / "cross.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "max_block_size": "64MiB",
                "max_inflight_bytes": "1MiB",
                "wire_frame_size": "1KiB",
                "local_cpu": False,
                "namespace_quotas": {"team-a": "1MiB"},
            }
        )
    )
    done = _config_check(config, "--json")
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert len(report["errors"]) == 3, report
    assert any("max_block_size:" in e for e in report["errors"])
    assert any("wire_frame_size: must be at least 4KiB" in e for e in report["errors"])
    assert any("namespace_quotas: needs the CPU tier" in e for e in report["errors"])


def test_a_cross_key_check_on_an_invalid_value_is_not_reported(tmp_path: Path) -> None:
    # The disk budget is unreadable: "local_disk is set but the disk budget is 0" would judge
    # the default that stands in for it, so only the value's own problem is reported.
    config = tmp_path / "bad-budget.yaml"
    config.write_text(
        yaml.safe_dump({"local_disk": str(tmp_path / "disk"), "max_local_disk_size": "lots"})
    )
    done = _config_check(config)
    assert done.returncode == 2
    (error,) = _errors(done)
    assert f"{config}: max_local_disk_size:" in error


def test_a_cross_key_problem_names_the_env_variable_that_set_the_key(tmp_path: Path) -> None:
    config = tmp_path / "plain.yaml"
    config.write_text(yaml.safe_dump({"chunk_size": 256}))
    done = _config_check(config, env={"LMCACHED_MAX_LOCAL_DISK_SIZE": "20"})
    assert done.returncode == 2
    (error,) = _errors(done)
    assert error.endswith(
        "env LMCACHED_MAX_LOCAL_DISK_SIZE: local_disk: max_local_disk_size is set but local_disk "
        "is not; name a folder"
    ), error
