"""LMCache configs run as they are: every key of LMCache 0.5.6's schema has a treatment.

The fixture is LMCache's own key list (scripts/lmcache_schema.py reads it from the wheel), so a
key LMCache has and this table lacks fails here, not in a user's migration.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmcached import config as config_mod
from lmcached import config_lmcache
from lmcached.errors import ConfigError, ConfigErrors

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCHEMA = json.loads((FIXTURES / "lmcache_0_5_6_config_keys.json").read_text())


def _write(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "lmcache.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _fixture_default(value: Any) -> Any:
    if isinstance(value, dict) and value.get("expr") in ("float('inf')", 'float("inf")'):
        return math.inf
    return value


def test_every_lmcache_key_and_alias_has_a_treatment() -> None:
    assert set(SCHEMA["keys"]) == set(config_lmcache.LMCACHE_KEYS)
    assert SCHEMA["aliases"] == config_lmcache.LMCACHE_ALIASES
    assert len(SCHEMA["keys"]) >= 100


@pytest.mark.parametrize("name", sorted(SCHEMA["keys"]))
def test_lmcache_default_values_load_silently(name: str) -> None:
    """A file that spells out LMCache's defaults asks for nothing: no warning, no error."""
    default = _fixture_default(SCHEMA["keys"][name])
    if name in ("max_local_cpu_size",):
        default = 0.25  # LMCache's 5 GiB default is fine too, but not on every test host
    cfg = config_mod.from_mapping({name: default}, environ={})
    assert cfg.warnings == []


@pytest.mark.parametrize("alias", sorted(SCHEMA["aliases"]))
def test_every_lmcache_alias_loads(alias: str) -> None:
    target = SCHEMA["aliases"][alias]
    default = _fixture_default(SCHEMA["keys"][target])
    config_mod.from_mapping({alias: default}, environ={})


def test_keys_without_an_equivalent_warn_once_naming_the_key_and_why() -> None:
    cfg = config_mod.from_mapping(
        {
            "enable_blending": True,
            "min_retrieve_tokens": 64,
            "lookup_timeout_ms": 500,
            "py_enable_gc": False,
            "mp_port": 6000,
        },
        source="/etc/lmcache.yaml",
        environ={},
    )
    assert len(cfg.warnings) == 5
    by_key = {w.split(": ")[1]: w for w in cfg.warnings}
    assert "CacheBlend" in by_key["enable_blending"]
    assert by_key["enable_blending"].startswith("/etc/lmcache.yaml: enable_blending: ignored: ")
    assert "connector loads every hit" in by_key["min_retrieve_tokens"]
    # The old hint pointed lookup_timeout_ms at plugin_stop_timeout.
    assert "plugin_stop_timeout" not in by_key["lookup_timeout_ms"]
    assert "request_timeout" in by_key["lookup_timeout_ms"]


def test_connector_feature_keys_are_left_to_the_connector_silently() -> None:
    # The vLLM connector reads these from the same file (LMCACHE_CONFIG_FILE) or LMCACHE_<KEY>;
    # the daemon reading that file must neither warn about them nor act on them.
    cfg = config_mod.from_mapping(
        {"save_unfull_chunk": True, "use_layerwise": False, "enable_async_loading": True},
        environ={"LMCACHE_USE_LAYERWISE": "True"},
    )
    assert cfg.warnings == []
    assert cfg == config_mod.from_mapping({}, environ={})
    for name in config_lmcache.CONNECTOR_KEYS:
        assert config_lmcache.LMCACHE_KEYS[name].kind == "connector"


def test_cache_policy_is_the_eviction_policy_not_the_write_policy() -> None:
    cfg = config_mod.from_mapping({"cache_policy": "LRU"}, environ={})
    assert cfg.eviction_policy == "lru" and cfg.warnings == []
    cfg = config_mod.from_mapping({"cache_policy": "S3FIFO"}, environ={})
    assert cfg.eviction_policy == "s3fifo"
    assert cfg.write_policy == "write-through"
    cfg = config_mod.from_mapping({"cache_policy": "LFU"}, environ={})
    assert cfg.eviction_policy == "lru"
    assert "eviction policy 'LFU' has no lmcached equivalent" in cfg.warnings[0]


def test_our_own_key_wins_over_the_lmcache_key_mapped_onto_it() -> None:
    cfg = config_mod.from_mapping({"eviction_policy": "lru", "cache_policy": "S3FIFO"}, environ={})
    assert cfg.eviction_policy == "lru"
    assert any("cache_policy: overridden by 'eviction_policy'" in w for w in cfg.warnings)


def test_keys_that_would_change_results_fail_with_what_to_do_instead() -> None:
    with pytest.raises(ConfigError, match=r"enable_pd: disaggregated prefill.*NixlConnector"):
        config_mod.from_mapping({"enable_pd": True}, environ={})
    with pytest.raises(ConfigError, match="enable_xpyd: disaggregated"):
        config_mod.from_mapping({"enable_xpyd": True}, environ={})  # LMCache's old alias
    with pytest.raises(ConfigError, match="remote_config_url: lmcached does not fetch"):
        config_mod.from_mapping({"remote_config_url": "http://cfg:8080"}, environ={})
    with pytest.raises(ConfigError, match="enable_hidden_state_cache: hidden-state caching"):
        config_mod.from_mapping({"enable_hidden_state_cache": True}, environ={})


def test_extra_config_lmcache_keys_are_no_longer_ignored_silently() -> None:
    cfg = config_mod.from_mapping(
        {"extra_config": {"use_odirect": True, "save_chunk_meta": False, "my_plugin_knob": 3}},
        environ={},
    )
    assert cfg.disk_drop_cache is True
    assert len(cfg.warnings) == 1
    assert "extra_config.save_chunk_meta: ignored" in cfg.warnings[0]
    # Keys LMCache does not define stay free-form settings of extensions.
    assert cfg.extra_config["my_plugin_knob"] == 3


def test_every_problem_is_reported_at_once_with_its_source(tmp_path: Path) -> None:
    path = _write(tmp_path, {"num_workers": 0, "chunk_sise": 256, "enable_pd": True})
    with pytest.raises(ConfigErrors) as info:
        config_mod.load(path, environ={"LMCACHED_PORT": "not-a-port"})
    lines = [str(p) for p in info.value.problems]
    assert len(lines) == 4, lines
    assert f"{path.absolute()}: num_workers: expected a positive integer, got 0" in lines
    assert any("chunk_sise: unknown key (did you mean 'chunk_size'?)" in line for line in lines)
    assert any(line.startswith("env LMCACHED_PORT: port: expected a port") for line in lines)


def test_invalid_lmcached_num_workers_is_blamed_on_the_env_var_not_the_file(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, {"num_workers": 2})
    with pytest.raises(ConfigError) as info:
        config_mod.load(path, environ={"LMCACHED_NUM_WORKERS": "two"})
    assert str(info.value).startswith("env LMCACHED_NUM_WORKERS: num_workers: ")
    assert str(path) not in str(info.value)


def test_precedence_file_then_lmcache_env_then_lmcached_env(tmp_path: Path) -> None:
    path = _write(tmp_path, {"chunk_size": 64, "max_local_cpu_size": 0.5})
    env = {"LMCACHE_CHUNK_SIZE": "128", "LMCACHE_MAX_LOCAL_CPU_SIZE": "'0.25'"}
    cfg = config_mod.load(path, environ=env)
    assert cfg.chunk_size == 128  # LMCache's env beats the file, as in LMCache
    assert cfg.max_local_cpu_size == (1 << 30) // 4  # quoted values are unquoted, as LMCache does
    cfg = config_mod.load(path, environ={**env, "LMCACHED_CHUNK_SIZE": "32"})
    assert cfg.chunk_size == 32  # our own LMCACHED_* beats LMCACHE_*


def test_lmcache_config_file_names_the_file_when_no_path_is_given(tmp_path: Path) -> None:
    path = _write(tmp_path, {"chunk_size": 64, "enable_blending": True})
    cfg = config_mod.load(None, environ={"LMCACHE_CONFIG_FILE": str(path)})
    assert cfg.chunk_size == 64 and cfg.source == str(path.absolute())
    assert len(cfg.warnings) == 1
    other = tmp_path / "ours.yaml"
    other.write_text("chunk_size: 16\n")
    cfg = config_mod.load(other, environ={"LMCACHE_CONFIG_FILE": str(path)})
    assert cfg.chunk_size == 16  # an explicit path comes first


def test_lmcache_names_that_are_not_config_keys_are_ignored() -> None:
    env = {
        "LMCACHE_DISABLE_BANNER": "1",
        "LMCACHE_PLUGIN_CONFIG": "{not yaml",
        "LMCACHE_PLUGIN_ROLE": "worker",
        "LMCACHE_RUNTIME_PLUGIN_WORKER_ID": "0",
        "LMCACHE_USE_EXPERIMENTAL": "True",
        "LMCACHE_EC_CHUNK_SIZE": "7",
    }
    cfg = config_mod.from_mapping({}, environ=env)
    assert cfg.chunk_size == 256 and cfg.warnings == []


def test_lmcache_env_warnings_name_the_env_var() -> None:
    cfg = config_mod.from_mapping({}, environ={"LMCACHE_SAVE_DECODE_CACHE": "True"})
    assert cfg.warnings == [
        "env LMCACHE_SAVE_DECODE_CACHE: save_decode_cache: ignored: only prompt (prefill) "
        "chunks are stored"
    ]


def test_lmcache_remote_url_forms_are_accepted() -> None:
    for url in (
        "redis-cluster://127.0.0.1:7000,127.0.0.1:7001",
        "redis-sentinel://user:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster",
        "valkey://127.0.0.1:6379/0",
    ):
        assert config_mod.from_mapping({"remote_url": url}, environ={}).remote_url == url
    with pytest.raises(ConfigError, match=r"node '127.0.0.1' .* is not host:port"):
        config_mod.from_mapping({"remote_url": "redis-sentinel://127.0.0.1/m"}, environ={})


def test_fs_url_with_lmcache_host_and_port_uses_the_path_with_a_note() -> None:
    cfg = config_mod.from_mapping({"remote_url": "fs://localhost:0/mnt/kv"}, environ={})
    assert cfg.warnings == [
        "config: remote_url: the host and port of fs://localhost:0 are ignored; fs:// names a "
        "folder on this machine (/mnt/kv)"
    ]
    from lmcached.storage.remote.fs_connector import FSConnector

    assert FSConnector("fs://localhost:0/mnt/kv", timeout=1.0).root == "/mnt/kv"


def test_unsupported_lmcache_schemes_name_the_nearest_alternative() -> None:
    message = config_lmcache.unsupported_scheme_message("mooncakestore")
    assert message is not None and "mooncakestore://" in message and "redis://" in message
    assert config_lmcache.unsupported_scheme_message("redis") is None


def test_vllm_connector_lmcache_keys_map_or_warn() -> None:
    settings, warnings = config_lmcache.map_lmcache_connector_keys(
        {
            "lmcache.chunk_size": 128,
            "lmcache.lookup_timeout_ms": 250,
            "lmcache.enable_blending": True,
            "lmcache.max_local_cpu_size": 20,
            "lmcache.mp.port": 5555,
            "lmcached.endpoint": "ipc:///run/x",
        }
    )
    assert settings == {"lmcached.chunk_size": 128, "lmcached.lookup_timeout": 0.25}
    assert len(warnings) == 3
    assert any("lmcache.enable_blending: ignored" in w and "CacheBlend" in w for w in warnings)
    assert any("lmcache.max_local_cpu_size" in w and "daemon's config file" in w for w in warnings)
    # An explicit lmcached.* key wins.
    settings, _ = config_lmcache.map_lmcache_connector_keys(
        {"lmcache.chunk_size": 128, "lmcached.chunk_size": 64}
    )
    assert settings == {}


def test_vllm_connector_feature_keys_map_to_the_connector_settings(tmp_path: Path) -> None:
    settings, warnings = config_lmcache.map_lmcache_connector_keys(
        {"lmcache.save_unfull_chunk": "false", "lmcache.use_layerwise": False}
    )
    assert settings == {"lmcached.save_partial_chunks": False, "lmcached.load_mode": "sync"}
    assert warnings == []
    # The same keys in LMCache's file and environment, where LMCache's connector reads them.
    path = _write(tmp_path, {"use_layerwise": True, "enable_async_loading": True, "chunk_size": 8})
    inherited, problems = config_lmcache.lmcache_connector_entries(
        {"LMCACHE_CONFIG_FILE": str(path), "LMCACHE_SAVE_UNFULL_CHUNK": "False"}
    )
    assert problems == []
    assert inherited == {
        "lmcache.use_layerwise": (True, str(path)),
        "lmcache.enable_async_loading": (True, str(path)),
        "lmcache.save_unfull_chunk": ("False", "env LMCACHE_SAVE_UNFULL_CHUNK"),
    }
    settings, warnings = config_lmcache.map_lmcache_connector_keys({}, inherited)
    assert settings == {"lmcached.save_partial_chunks": False, "lmcached.load_mode": "layerwise"}
    (warning,) = warnings
    assert warning.startswith(f"{path}: lmcache.enable_async_loading: ignored: ")


def test_migration_guide_is_generated_from_the_mapping_table() -> None:
    import runpy

    root = Path(__file__).resolve().parents[1]
    render = runpy.run_path(str(root / "scripts" / "lmcache_migration.py"))["render"]
    page = (root / "docs" / "migrating-from-lmcache.md").read_text()
    assert page == render(), (
        "docs/migrating-from-lmcache.md is stale: regenerate it with "
        "`python scripts/lmcache_migration.py > docs/migrating-from-lmcache.md`"
    )
    for name in SCHEMA["keys"]:
        assert f"| `{name}` |" in page
    for alias in SCHEMA["aliases"]:
        assert f"| `{alias}` |" in page


def test_empty_values_of_unset_lmcache_keys_ask_for_nothing() -> None:
    cfg = config_mod.from_mapping(
        {"remote_config_url": "", "blend_thresholds": [], "p2p_host": None}, environ={}
    )
    assert cfg.warnings == []
