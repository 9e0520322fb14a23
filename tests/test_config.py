"""Every config validation path fails at load with one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lmcached import config as config_mod
from lmcached.errors import ConfigError

GIB = 1 << 30


def load(data, environ=None):
    return config_mod.from_mapping(data, environ=environ or {})


def test_defaults_are_valid():
    cfg = load({})
    assert cfg.num_workers == 2 and cfg.chunk_size == 256
    assert cfg.max_local_cpu_size == 2 * GIB
    assert cfg.cpu_budget_per_worker == GIB


@pytest.mark.parametrize(
    "value,expected",
    [
        (1.5, int(1.5 * GIB)),
        (2, 2 * GIB),
        ("512MiB", 512 << 20),
        ("2GB", 2 * 10**9),
        ("3", 3 * GIB),
        ("64KiB", 64 << 10),
    ],
)
def test_sizes_follow_lmcache_units(value, expected):
    assert load({"max_local_cpu_size": value}).max_local_cpu_size == expected


@pytest.mark.parametrize(
    "data,key,fragment",
    [
        ({"max_local_cpu_sze": 1}, "max_local_cpu_sze", "did you mean 'max_local_cpu_size'"),
        ({"bogus_key": 1}, "bogus_key", "unknown key"),
        ({"num_workers": "two"}, "num_workers", "positive integer"),
        ({"num_workers": 0}, "num_workers", "positive integer"),
        ({"num_workers": True}, "num_workers", "positive integer"),
        ({"max_local_cpu_size": "lots"}, "max_local_cpu_size", "size"),
        ({"max_local_cpu_size": -1}, "max_local_cpu_size", "non-negative"),
        ({"max_block_size": "12 parsecs"}, "max_block_size", "size"),
        ({"port": 70000}, "port", "port number"),
        ({"host": "a b"}, "host", "host name"),
        ({"local_cpu": "maybe"}, "local_cpu", "true or false"),
        ({"log_level": "loud"}, "log_level", "one of"),
        ({"request_timeout": 0}, "request_timeout", "seconds"),
        ({"extra_config": [1]}, "extra_config", "mapping"),
        (
            {"max_block_size": "1GiB", "max_inflight_bytes": "512MiB"},
            "max_block_size",
            "max_inflight_bytes",
        ),
        ({"port": 65535, "num_workers": 4}, "port", "exceeds"),
        ({"wire_frame_size": "1KiB"}, "wire_frame_size", "4KiB"),
    ],
)
def test_validation_errors_name_the_key(data, key, fragment):
    with pytest.raises(ConfigError) as err:
        load(data)
    assert err.value.key == key
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_env_overrides_known_keys_and_ignores_other_lmcached_names():
    cfg = load(
        {"num_workers": 2},
        environ={
            "LMCACHED_NUM_WORKERS": "3",
            "LMCACHED_PLUGINS": "a,b",
            "LMCACHED_CONTROL_ENDPOINT": "x",
        },
    )
    assert cfg.num_workers == 3
    with pytest.raises(ConfigError) as err:
        load({}, environ={"LMCACHED_MAX_LOCAL_CPU_SIZE": "huge"})
    assert err.value.key == "max_local_cpu_size"


def test_non_mapping_file_and_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError):
        config_mod.load(p)
    p.write_text("num_workers: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        config_mod.load(p)
    assert "YAML" in str(err.value)
    with pytest.raises(ConfigError):
        config_mod.load(tmp_path / "missing.yaml")


def test_sizes_round_trip_through_the_worker_handoff():
    cfg = load({"max_local_cpu_size": "256MiB", "max_block_size": "48MiB"})
    again = load(cfg.to_dict(redact=False))
    assert again.max_local_cpu_size == 256 << 20 and again.max_block_size == 48 << 20


def test_secrets_are_redacted():
    assert config_mod.redact_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert config_mod.redact_url("redis://user:hunter2@h:6379") == "redis://user:***@h:6379"
    assert (
        config_mod.redact_url("redis://h:6379?password=x&db=1")
        == "redis://h:6379?password=***&db=1"
    )
    doc = config_mod.redact_value(
        "extra_config", {"token": "t0k", "url": "rediss://:pw@x", "plain": "ok"}
    )
    assert doc == {"token": "***", "url": "rediss://:***@x", "plain": "ok"}


def test_memory_warning_when_budget_exceeds_available_memory():
    assert (
        config_mod.memory_warning(load({"max_local_cpu_size": "1PiB".replace("PiB", "TiB")}))
        is not None
    )
    assert config_mod.memory_warning(load({"max_local_cpu_size": "1MiB"})) is None


def test_two_configs_get_different_runtime_folders(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("port: 0\n")
    b.write_text("port: 0\n")
    assert config_mod.load(a).instance_dir != config_mod.load(b).instance_dir


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lmcached", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_cli_config_check_and_show(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump({"num_workers": 3, "extra_config": {"remote_password": "s3cret"}})
    )
    ok = run_cli("config", "check", "--config", str(good))
    assert ok.returncode == 0, ok.stderr
    shown = run_cli("config", "show", "--config", str(good))
    assert "num_workers: 3" in shown.stdout and "s3cret" not in shown.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_local_cpu_sze: 2\n")
    out = run_cli("config", "check", "--config", str(bad))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "max_local_cpu_sze" in out.stderr and "max_local_cpu_size" in out.stderr


def test_cli_version():
    out = run_cli("--version")
    assert out.returncode == 0 and "protocol" in out.stdout


def test_example_file_documents_every_key():
    from pathlib import Path

    example = Path(__file__).parent.parent / "config" / "lmcached.example.yaml"
    assert example.read_text().strip() == config_mod.example_yaml().strip(), (
        "config/lmcached.example.yaml is stale: regenerate it with "
        "`lmcached config example > config/lmcached.example.yaml`"
    )


def test_shipped_default_config_is_valid():
    from pathlib import Path

    cfg = config_mod.load(Path(__file__).parent.parent / "config" / "lmcached.yaml", environ={})
    assert cfg.num_workers == 2 and cfg.host == "127.0.0.1" and cfg.local_cpu
