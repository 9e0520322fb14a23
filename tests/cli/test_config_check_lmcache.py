"""`lmcached config check` on LMCache's own configs and environment, through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "lmcache_examples"
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def _lmcached(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LMCACHE_", "LMCACHED_"))}
    clean["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, clean.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "lmcached", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


@pytest.mark.parametrize("example", ["cpu-offload.yaml", "disk-offload.yaml", "redis.yaml"])
def test_lmcache_documented_examples_pass_config_check(example: str) -> None:
    done = _lmcached("config", "check", "--config", str(EXAMPLES / example))
    assert done.returncode == 0, done.stderr
    assert "config ok" in done.stdout
    assert "Traceback" not in done.stderr


def test_config_check_reports_every_problem_in_one_run_naming_each_source(
    tmp_path: Path,
) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text(
        yaml.safe_dump(
            {"chunk_size": 0, "enable_pd": True, "save_unfull_chunk": True, "blend_min_tokens": 1}
        )
    )
    done = _lmcached(
        "config",
        "check",
        "--config",
        str(config),
        env={"LMCACHED_NUM_WORKERS": "many", "LMCACHE_MAX_LOCAL_CPU_SIZE": "lots"},
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "config error" in line]
    assert len(errors) == 4, done.stderr
    assert any(f"{config}: chunk_size: expected a positive integer" in e for e in errors)
    assert any(f"{config}: enable_pd: disaggregated prefill" in e for e in errors)
    assert any("env LMCACHED_NUM_WORKERS: num_workers:" in e for e in errors)
    assert any("env LMCACHE_MAX_LOCAL_CPU_SIZE: max_local_cpu_size:" in e for e in errors)
    assert "Traceback" not in done.stderr


def test_config_check_prints_one_warning_per_ignored_lmcache_key(tmp_path: Path) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "chunk_size": 256,
                "max_local_cpu_size": 0.25,
                "enable_blending": True,
                "save_decode_cache": True,
                "use_layerwise": True,  # the vLLM connector's key: no daemon warning
                "cache_policy": "LRU",
                "extra_config": {"save_chunk_meta": False},
            }
        )
    )
    done = _lmcached("config", "check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, done.stderr
    assert any("enable_blending: ignored: CacheBlend" in w for w in warnings)
    assert any("save_decode_cache: ignored" in w for w in warnings)
    assert any("extra_config.save_chunk_meta: ignored" in w for w in warnings)


def test_lmcache_config_file_env_is_read_without_config(tmp_path: Path) -> None:
    config = tmp_path / "from-lmcache-env.yaml"
    config.write_text("chunk_size: 128\nmax_local_cpu_size: 0.25\n")
    done = _lmcached("config", "check", env={"LMCACHE_CONFIG_FILE": str(config)})
    assert done.returncode == 0, done.stderr
    assert f"config ok: {config}" in done.stdout


@pytest.mark.parametrize(
    ("url", "alternative"),
    [
        ("lm://127.0.0.1:65432", "redis:// or fs://"),
        ("mooncakestore://127.0.0.1:50051", "redis://"),
        ("infinistore://127.0.0.1:12345", "redis://"),
    ],
)
def test_unsupported_lmcache_scheme_fails_in_one_line_naming_it(
    tmp_path: Path, url: str, alternative: str
) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text(yaml.safe_dump({"remote_url": url, "max_local_cpu_size": 0.25}))
    done = _lmcached("config", "check", "--config", str(config))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    scheme = url.split("://")[0]
    assert f"{scheme}:// connector is not supported" in lines[0] and alternative in lines[0]


@pytest.mark.parametrize(
    "url",
    [
        "redis-cluster://127.0.0.1:7000,127.0.0.1:7001",
        "redis-sentinel://127.0.0.1:26379/mymaster",
        "valkey://127.0.0.1:6379/0",
        "fs://localhost:0/tmp/lmcache-shared",
    ],
)
def test_lmcache_remote_url_forms_pass_config_check(tmp_path: Path, url: str) -> None:
    config = tmp_path / "lmcache.yaml"
    config.write_text(yaml.safe_dump({"remote_url": url, "max_local_cpu_size": 0.25}))
    done = _lmcached("config", "check", "--config", str(config))
    assert done.returncode == 0, done.stderr
