"""The connector's settings and key identity: what makes two requests share KV or not."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lmcached.integrations.vllm import (
    ConnectorSettings,
    check_chunk_size,
    checkpoint_fingerprint,
    key_part,
    parse_settings,
    read_settings,
    request_extra,
)


def test_settings_are_read_and_converted():
    settings = parse_settings(
        {
            "lmcached.endpoint": "ipc:///tmp/x",
            "lmcached.chunk_size": "512",
            "lmcached.timeout": 2,
            "lmcached.save": "false",
            "other_connector.key": 1,  # belongs to another connector: ignored
        }
    )
    assert settings == ConnectorSettings(
        endpoint="ipc:///tmp/x", chunk_size=512, timeout=2.0, save=False
    )
    assert parse_settings(None) == ConnectorSettings()


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"did you mean 'lmcached\.chunk_size'"):
        parse_settings({"lmcached.chunksize": 256})


@pytest.mark.parametrize(
    ("key", "value"),
    [("lmcached.chunk_size", "many"), ("lmcached.timeout", 0), ("lmcached.load", "maybe")],
)
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        parse_settings({key: value})


def test_key_parts_are_slash_free_and_bounded():
    assert key_part("meta-llama/Llama-3.1-8B") == "meta-llama_Llama-3.1-8B"
    long = key_part("x" * 200)
    assert len(long) == 64 and "/" not in long
    assert key_part("x" * 200) != key_part("x" * 199 + "y")


def request(**fields):
    base = {"cache_salt": None, "lora_request": None, "mm_features": []}
    base.update(fields)
    return SimpleNamespace(**base)


def test_extra_separates_salts_adapters_and_images():
    plain = request_extra(request())
    assert plain == b""  # plain requests build the same keys as any other lmcached client
    salted = {request_extra(request(cache_salt=s)) for s in ("a", "b")}
    assert len(salted) == 2 and plain not in salted
    lora = SimpleNamespace(lora_name="sql", lora_int_id=1, lora_path="/adapters/sql")
    assert request_extra(request(lora_request=lora)) not in salted | {plain}
    image = [SimpleNamespace(identifier="abc123")]
    assert request_extra(request(mm_features=image)) != request_extra(
        request(mm_features=[SimpleNamespace(identifier="abc124")])
    )


def test_checkpoint_fingerprint_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"\x01" * 100)
    first = checkpoint_fingerprint(str(tmp_path))
    assert first is not None and first == checkpoint_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x02" * 100)
    assert checkpoint_fingerprint(str(tmp_path)) != first
    assert checkpoint_fingerprint(str(tmp_path / "missing")) is None


def test_a_chunk_size_that_is_not_whole_blocks_fails_with_the_fix():
    check_chunk_size(256, 32, "lmcached.chunk_size")
    with pytest.raises(
        ValueError, match=r"the daemon's chunk_size is 100, which vLLM's block_size 32"
    ):
        check_chunk_size(100, 32, "the daemon's chunk_size")


def test_load_mode_is_auto_by_default_and_checked():
    assert parse_settings(None).load_mode == "auto"
    assert parse_settings({"lmcached.load_mode": "layerwise"}).load_mode == "layerwise"
    assert parse_settings({"lmcached.load_mode": "sync"}).load_mode == "sync"
    with pytest.raises(ValueError, match="must be one of auto, layerwise, sync"):
        parse_settings({"lmcached.load_mode": "async"})


def test_lmcache_connector_keys_map_to_connector_settings():
    settings, warnings = read_settings(
        {
            "lmcache.save_unfull_chunk": False,
            "lmcache.use_layerwise": "false",
            "lmcache.chunk_size": "512",
            "lmcache.enable_blending": True,
        },
        environ={},
    )
    assert settings == ConnectorSettings(
        chunk_size=512, save_partial_chunks=False, load_mode="sync"
    )
    assert warnings == [
        "kv_connector_extra_config: lmcache.enable_blending: ignored: CacheBlend (reusing "
        "non-prefix chunks) is not supported; lmcached serves prefix hits only"
    ]
    assert read_settings({"lmcache.use_layerwise": True}, environ={})[0].load_mode == "layerwise"


def test_lmcached_keys_win_over_lmcache_keys():
    settings, warnings = read_settings(
        {"lmcache.use_layerwise": False, "lmcached.load_mode": "layerwise"}, environ={}
    )
    assert settings.load_mode == "layerwise" and warnings == []


def test_async_loading_warns_that_loads_are_layerwise_instead():
    settings, warnings = read_settings({"lmcache.enable_async_loading": True}, environ={})
    assert settings == ConnectorSettings()
    (warning,) = warnings
    assert warning.startswith("kv_connector_extra_config: lmcache.enable_async_loading: ignored:")
    assert "loads are layer-wise instead" in warning
    assert read_settings({"lmcache.enable_async_loading": "false"}, environ={})[1] == []


def test_lmcache_config_file_and_env_reach_the_connector(tmp_path):
    path = tmp_path / "lmcache.yaml"
    path.write_text(
        "chunk_size: 64\n"  # a daemon key: the connector leaves it to the daemon
        "save_unfull_chunk: false\n"
        "use_layerwise: false\n"
        "enable_async_loading: true\n"
    )
    settings, warnings = read_settings(None, environ={"LMCACHE_CONFIG_FILE": str(path)})
    assert settings == ConnectorSettings(save_partial_chunks=False, load_mode="sync")
    (warning,) = warnings
    assert warning.startswith(f"{path}: lmcache.enable_async_loading: ignored:")

    # As in LMCache: LMCACHE_<KEY> beats the file, lmcache.* in the engine's config beats both.
    env = {
        "LMCACHE_CONFIG_FILE": str(path),
        "LMCACHE_USE_LAYERWISE": "True",
        "LMCACHE_SAVE_UNFULL_CHUNK": "'true'",
    }
    settings, _ = read_settings(None, environ=env)
    assert settings.load_mode == "layerwise" and settings.save_partial_chunks is True
    settings, _ = read_settings({"lmcache.use_layerwise": False}, environ=env)
    assert settings.load_mode == "sync"


def test_an_unreadable_lmcache_config_file_warns_and_keeps_the_defaults(tmp_path):
    missing = tmp_path / "missing.yaml"
    settings, warnings = read_settings(None, environ={"LMCACHE_CONFIG_FILE": str(missing)})
    assert settings == ConnectorSettings()
    (warning,) = warnings
    assert warning.startswith(f"LMCACHE_CONFIG_FILE={missing}: cannot read it")


def test_a_bad_lmcache_value_is_named_and_ignored():
    settings, warnings = read_settings({"lmcache.save_unfull_chunk": "maybe"}, environ={})
    assert settings == ConnectorSettings()
    assert warnings == [
        "kv_connector_extra_config: lmcache.save_unfull_chunk='maybe': ignored: "
        "expected true or false"
    ]


def test_an_lmcache_value_our_setting_refuses_is_a_warning_not_a_failed_start():
    settings, warnings = read_settings({"lmcache.blocking_timeout_secs": 0}, environ={})
    assert settings == ConnectorSettings()
    assert warnings == [
        "kv_connector_extra_config: lmcached.timeout=0.0: must be positive "
        "(mapped from an lmcache.* key): ignored"
    ]
