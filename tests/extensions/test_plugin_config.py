"""LMCache-style config: external backends and connectors, their order, options, lifecycle."""

from __future__ import annotations

import pytest

from lmcached import config
from lmcached.codecs.base import codec_of
from lmcached.codecs.tier import CodecTier
from lmcached.daemon import assembly
from lmcached.daemon.assembly import check_store_config, plan_store
from lmcached.errors import ConfigError
from lmcached.extensions import sources, startup
from lmcached.extensions.guard import GuardedBackend, GuardedConnector
from lmcached.extensions.lifecycle import PluginStartupError
from lmcached.storage.base import Block
from lmcached.storage.blockformat import decode_header
from lmcached.storage.cpu import CPUBackend
from lmcached.storage.remote import RemoteBackend
from lmcached.storage.tiered import TieredStore

MODULE = "lmcached_example_plugins.sqlite_backend"


def backend_keys(name: str, path, prefix: str = "external_backend", **options) -> dict:
    keys = {
        f"{prefix}.{name}.module_path": MODULE,
        f"{prefix}.{name}.class_name": "SqliteBackend",
        f"{prefix}.{name}.path": str(path),
    }
    keys.update({f"{prefix}.{name}.{k}": v for k, v in options.items()})
    return keys


def load(**data) -> config.Config:
    return config.from_mapping(data, environ={})


def checked(**data) -> config.Config:
    """Load a config and run the store check that `lmcached config check` and workers run."""
    cfg = load(**data)
    check_store_config(cfg)
    return cfg


def test_external_backend_and_connector_load_from_lmcache_config(example_installed, tmp_path):
    extra = backend_keys("sqlite", tmp_path / "blocks-{worker_id}.sqlite")
    extra.update(
        {
            "external_connector.folder.module_path": "lmcached_example_plugins.folder_connector",
            "external_connector.folder.class_name": "FolderConnector",
            "external_connector.folder.fsync": True,
        }
    )
    cfg = load(external_backends=["sqlite"], extra_config=extra)
    externals = assembly.build_external_backends(plan_store(cfg), worker_id=3)
    assert [type(b) for b in externals] == [GuardedBackend]
    assert externals[0].inner.path == str(tmp_path / "blocks-3.sqlite")
    store = TieredStore([CPUBackend(1 << 20), *externals])
    try:
        externals[0].put(b"k1", Block.from_bytes(b"from sqlite"))
        assert bytes(store.get(b"k1").tobytes()) == b"from sqlite"
        assert store.tiers[0].contains(b"k1")  # promoted into CPU
        assert store.stats()["sqlite"]["plugin"]["hits"] == 1  # metrics under the plugin's name
        assert startup.extension_states()["sqlite"]["state"] == "running"
    finally:
        store.close()
        store.close()

    connector = assembly.build_remote_connector(
        plan_store(cfg), remote_url=f"folder://{tmp_path}/remote"
    )
    # The external connector sits behind the tiers' RemoteBackend, like a built-in one.
    assert isinstance(connector, GuardedConnector)
    assert type(connector.inner).__name__ == "FolderConnector"
    assert connector.inner.config.fsync is True
    tier = CodecTier(RemoteBackend(connector), "zstd")
    payload = bytes(range(256)) * 64
    assert tier.put(b"k2", Block.from_bytes(payload))
    stored = (tmp_path / "remote" / b"lmcached:k2".hex()).read_bytes()
    header = decode_header(stored)  # the tiers' block header, naming the stored key
    assert header.key == b"lmcached:k2"
    assert codec_of(stored[header.header_len :]) == "zstd" and len(stored) < len(payload)
    assert tier.get(b"k2").tobytes() == payload
    assert tier.get(b"absent") is None
    assert tier.stats()["plugin"]["puts"] == 1  # the plugin's metrics, in the remote tier
    tier.close()
    tier.close()


def test_external_backends_are_looked_up_in_listed_order(example_installed, tmp_path):
    extra = {
        **backend_keys("first", tmp_path / "a.sqlite"),
        **backend_keys("second", tmp_path / "b.sqlite"),
    }
    for order, expected in ((["first", "second"], b"A"), (["second", "first"], b"B")):
        cfg = load(external_backends=order, extra_config=extra)
        externals = assembly.build_external_backends(plan_store(cfg))
        assert [b.name for b in externals] == order
        by_name = {b.name: b for b in externals}
        by_name["first"].put(b"shared", Block.from_bytes(b"A"))
        by_name["second"].put(b"shared", Block.from_bytes(b"B"))
        store = TieredStore([CPUBackend(1 << 20), *externals])
        assert store.get(b"shared").tobytes() == expected
        store.close()


def test_storage_plugins_spelling_is_accepted_with_a_deprecation_note(example_installed, tmp_path):
    cfg = load(
        storage_plugins=["sq"],
        extra_config=backend_keys("sq", tmp_path / "x.sqlite", prefix="storage_plugin"),
    )
    plugins = sources.parse_config_plugins(cfg)
    assert [s.name for s in plugins.backends] == ["sq"]
    assert any("storage_plugins is deprecated" in n for n in plugins.notes)
    assert any("storage_plugin.* is deprecated" in n for n in plugins.notes)
    externals = assembly.build_external_backends(plan_store(cfg))
    assert [b.name for b in externals] == ["sq"]
    externals[0].close()
    with pytest.raises(ConfigError, match="keep one"):
        checked(external_backends=["a"], storage_plugins=["a"])


@pytest.mark.parametrize(
    ("extra", "key", "message"),
    [
        ({"capacity_bytes": "lots"}, "external_backend.sq.capacity_bytes", "expected an integer"),
        ({"colour": "red"}, "external_backend.sq.colour", "known options: capacity_bytes, path"),
    ],
)
def test_plugin_options_are_typed_and_errors_name_the_field(
    example_installed, tmp_path, extra, key, message
):
    with pytest.raises(ConfigError, match=message) as info:
        checked(external_backends=["sq"], extra_config=backend_keys("sq", tmp_path / "x", **extra))
    assert info.value.key == f"extra_config.{key}"


def test_missing_required_option_and_missing_class_name_fail_the_store_check(
    example_installed, tmp_path
):
    keys = backend_keys("sq", tmp_path / "x")
    del keys["external_backend.sq.path"]
    with pytest.raises(ConfigError, match="path: is required"):
        checked(external_backends=["sq"], extra_config=keys)
    keys = backend_keys("sq", tmp_path / "x")
    del keys["external_backend.sq.class_name"]
    with pytest.raises(ConfigError, match="external_backends lists 'sq'") as info:
        checked(external_backends=["sq"], extra_config=keys)
    assert info.value.key == "extra_config.external_backend.sq.class_name"


def test_a_broken_class_path_fails_the_store_check_not_the_first_request(registry, tmp_path):
    extra = {
        "external_backend.x.module_path": "no_such_module",
        "external_backend.x.class_name": "Backend",
        "external_connector.foo.module_path": "lmcached.storage.cpu",
        "external_connector.foo.class_name": "CPUBackend",
    }
    with pytest.raises(ConfigError, match="No module named 'no_such_module'"):
        checked(external_backends=["x"], extra_config=extra)
    del extra["external_backend.x.module_path"], extra["external_backend.x.class_name"]
    # A connector class that is not a RemoteConnector is refused by the interface check.
    with pytest.raises(ConfigError, match="does not implement RemoteConnector"):
        checked(extra_config=extra)


def test_backend_failing_on_startup_is_disabled_and_the_rest_start(example_installed, tmp_path):
    extra = {
        **backend_keys("broken", tmp_path / "missing-dir" / "x.sqlite"),
        **backend_keys("good", tmp_path / "good.sqlite"),
    }
    cfg = load(external_backends=["broken", "good"], extra_config=extra)
    externals = assembly.build_external_backends(plan_store(cfg))
    assert [b.name for b in externals] == ["good"]
    states = startup.extension_states()
    assert states["broken"]["state"] == "disabled"
    assert "unable to open database file" in states["broken"]["error"]
    assert states["good"]["state"] == "running"
    externals[0].close()

    strict = load(external_backends=["broken"], extra_config=extra, strict_plugins=True)
    with pytest.raises(PluginStartupError, match=r"'broken'.*unable to open database file"):
        assembly.build_external_backends(plan_store(strict))


def test_backend_raising_at_run_time_is_counted_and_answered_as_a_miss(example_installed, tmp_path):
    cfg = load(external_backends=["sq"], extra_config=backend_keys("sq", tmp_path / "x.sqlite"))
    (guarded,) = assembly.build_external_backends(plan_store(cfg))
    guarded.put(b"k", Block.from_bytes(b"v"))
    store = TieredStore([CPUBackend(1 << 20), guarded])
    guarded.inner.close()  # the plugin's database is gone: every call now raises
    assert store.get(b"k") is None
    assert store.put(b"k2", Block.from_bytes(b"v2"))  # the CPU tier still serves
    assert store.get(b"k2").tobytes() == b"v2"
    assert not guarded.contains(b"k")
    # The put reaches the external tier through the write-through queue; wait for it so the
    # count below does not depend on that thread's timing.
    assert store.flush(10)
    stats = store.stats()["sq"]
    # get, the queued put, contains, and the stats() call itself
    assert stats["plugin_errors"] == 4
    assert guarded.errors["get"] == 1 and guarded.errors["put"] == 1
    store.close()


def test_remote_serde_values_map_to_codecs_or_fail_clearly(registry):
    assert assembly.tier_codec(load(remote_serde="naive"), "remote") is None
    assert assembly.tier_codec(load(remote_serde="zstd"), "remote") == "zstd"
    assert assembly.tier_codec(load(remote_serde="naive", remote_codec="lz4"), "remote") == "lz4"
    assert assembly.tier_codec(load(disk_codec="zstd"), "disk") == "zstd"
    assert assembly.tier_codec(load(disk_codec="none"), "disk") is None
    with pytest.raises(ConfigError, match="quantize_tensor"):
        checked(remote_serde="kivi")
    with pytest.raises(ConfigError, match="no lmcached codec"):
        checked(remote_serde="cachegen")
    with pytest.raises(ConfigError, match="keep one"):
        checked(remote_serde="zstd", remote_codec="lz4")
    with pytest.raises(ConfigError, match="lossy and runs in the client"):
        checked(remote_codec="int8")
    with pytest.raises(ConfigError, match="known: int8, lz4, none, zstd"):
        checked(disk_codec="brotli")


def test_a_codec_from_a_package_is_usable_per_tier(example_installed):
    cfg = checked(disk_codec="zlib")
    assert assembly.tier_codec(cfg, "disk") == "zlib"


def test_a_second_config_replaces_the_first_ones_declarations(example_installed, tmp_path):
    from lmcached.extensions.registry import get_registry

    first = backend_keys("x", tmp_path / "x.sqlite")
    checked(external_backends=["x"], extra_config=first)
    assert get_registry().get_entry("storage_backend", "x").class_path.endswith(":SqliteBackend")
    second = {
        "external_backend.x.module_path": "lmcached.storage.cpu",
        "external_backend.x.class_name": "CPUBackend",
    }
    checked(external_backends=["x"], extra_config=second)
    assert get_registry().get_entry("storage_backend", "x").class_path == (
        "lmcached.storage.cpu:CPUBackend"
    )
    assert get_registry().shadowed("storage_backend", "x") == []
    checked()  # a config without declarations leaves none behind
    assert not get_registry().has("storage_backend", "x")
