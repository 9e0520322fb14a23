"""Remote connectors are registry entries, built-in and external alike, and every one of them
serves behind the tiers' RemoteBackend: block header and checksum, fail-fast health."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from extension_fixtures import write_distribution

from lmcached import config
from lmcached.daemon import assembly
from lmcached.daemon.assembly import build_tiers, plan_store
from lmcached.extensions import startup
from lmcached.extensions.guard import GuardedConnector
from lmcached.extensions.lifecycle import PluginStartupError
from lmcached.storage.base import Block, StorageBackend
from lmcached.storage.remote import RemoteBackend, RemoteConnector
from lmcached.storage.remote.fs_connector import FSConnector
from lmcached.storage.remote.redis_connector import (
    RedisClusterConnector,
    RedisConnector,
    RedisSentinelConnector,
)

FOLDER = {
    "external_connector.folder.module_path": "lmcached_example_plugins.folder_connector",
    "external_connector.folder.class_name": "FolderConnector",
}


def load(**data) -> config.Config:
    return config.from_mapping(data, environ={})


def checked(**data) -> config.Config:
    """Load a config and run the store check that `lmcached config check` and workers run."""
    cfg = load(**data)
    assembly.check_store_config(cfg)
    return cfg


def remote_tier(cfg: config.Config) -> tuple[RemoteBackend, list[StorageBackend]]:
    tiers = build_tiers(cfg, 0)
    (remote,) = [t for t in tiers if t.name == "remote"]
    assert isinstance(remote, RemoteBackend)
    return remote, tiers


def close_all(tiers: list[StorageBackend]) -> None:
    for tier in tiers:
        tier.close()


def test_built_in_schemes_are_registry_entries(registry):
    expected = {
        "redis": RedisConnector,
        "rediss": RedisConnector,
        "unix": RedisConnector,
        "redis+cluster": RedisClusterConnector,
        "rediss+cluster": RedisClusterConnector,
        # LMCache's schemes.
        "redis-cluster": RedisClusterConnector,
        "redis-sentinel": RedisSentinelConnector,
        "valkey": RedisConnector,
        "fs": FSConnector,
    }
    assert set(registry.names("remote_connector")) == set(expected)
    for scheme, cls in expected.items():
        entry = registry.get_entry("remote_connector", scheme)
        assert entry.builtin and entry.package == "lmcached"
        assert registry.get_class("remote_connector", scheme) is cls
    assert registry.validate("remote_connector") == []


def test_a_built_in_scheme_is_resolved_through_the_registry(registry, redis_server):
    remote, tiers = remote_tier(load(remote_url=redis_server.url))
    try:
        # A built-in keeps its own errors contract: no guard around it.
        assert type(remote.connector) is RedisConnector
        assert remote.put(b"k", Block.from_bytes(b"through the registry"))
        assert remote.get(b"k").tobytes() == b"through the registry"
    finally:
        close_all(tiers)
    with pytest.raises(config.ConfigError, match="registered: fs, redis, redis\\+cluster") as info:
        checked(remote_url="memcached://127.0.0.1:11211")
    assert info.value.key == "remote_url"


OVERRIDE_MANIFEST = """\
schema_version: "1.0"
remote_connector:
  fs:
    class: fs_override.conn:LabelledFS
    description: fs:// with a label in status
    priority: 10
"""

OVERRIDE_MODULE = """\
from lmcached.storage.remote.fs_connector import FSConnector


class LabelledFS(FSConnector):
    def describe(self):
        return "labelled " + super().describe()
"""


@pytest.fixture
def override_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution whose manifest claims the built-in ``fs`` scheme."""
    root = write_distribution(
        tmp_path / "override-site",
        "fs_override",
        "1.0",
        {"__init__.py": "", "plugins.yaml": OVERRIDE_MANIFEST, "conn.py": OVERRIDE_MODULE},
        """\
        [lmcached.plugins]
        fs-override = fs_override:plugins.yaml
        """,
    )
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    yield root
    for name in [m for m in sys.modules if m.startswith("fs_override")]:
        del sys.modules[name]


def test_an_external_package_overrides_a_built_in_scheme_by_priority(
    registry, override_dist, tmp_path
):
    shared = tmp_path / "shared"
    shared.mkdir()
    remote, tiers = remote_tier(load(remote_url=f"fs://{shared}"))
    try:
        entry = registry.get_entry("remote_connector", "fs")
        assert (entry.package, entry.priority, entry.builtin) == ("fs-override", 10, False)
        assert isinstance(remote.connector, GuardedConnector)
        assert type(remote.connector.inner).__name__ == "LabelledFS"
        assert remote.stats()["url"] == f"labelled fs://{shared}"
        assert remote.put(b"k", Block.from_bytes(b"overridden"))
        assert remote.get(b"k").tobytes() == b"overridden"
    finally:
        close_all(tiers)
    # The shadowed built-in stays reachable by its class path.
    (shadowed,) = registry.shadowed("remote_connector", "fs")
    assert shadowed.builtin and shadowed.class_path.endswith("fs_connector:FSConnector")
    assert registry.get_class("remote_connector", shadowed.class_path) is FSConnector


def test_an_external_connectors_corrupted_value_is_a_counted_miss(example_installed, tmp_path):
    folder = tmp_path / "kv"
    remote, tiers = remote_tier(load(remote_url=f"folder://{folder}", extra_config=FOLDER))
    try:
        assert isinstance(remote.connector, GuardedConnector)
        payload = bytes(range(256)) * 16
        assert remote.put(b"k", Block.from_bytes(payload))
        stored = folder / b"lmcached:k".hex()
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0x01  # one flipped bit in the payload: the header's checksum catches it
        stored.write_bytes(bytes(data))
        assert remote.get(b"k") is None
        stats = remote.stats()
        assert stats["checksum_failures"] == 1 and stats["misses"] == 1 and stats["hits"] == 0
        assert not stored.exists()  # the damaged value was deleted
        assert stats["up"] == 1  # damage is not an outage
    finally:
        close_all(tiers)


class FlakyConnector(RemoteConnector):
    """A connector that raises whatever it likes while ``broken`` is set, and counts calls."""

    def __init__(self, url: str, *, timeout: float) -> None:
        self.values: dict[bytes, bytes] = {}
        self.calls = 0
        self.broken = False

    def _enter(self) -> None:
        self.calls += 1
        if self.broken:
            raise RuntimeError("backend on fire")

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self._enter()
        return [self.values.get(k) for k in keys]

    def put_many(self, items, ttl) -> None:
        self._enter()
        for key, pieces in items:
            self.values[key] = b"".join(bytes(p) for p in pieces)

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._enter()
        return [k in self.values for k in keys]

    def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._enter()
        return [self.values.pop(k, None) is not None for k in keys]

    def scan(self, prefix: bytes) -> Iterator[bytes]:
        self._enter()
        return iter([k for k in self.values if k.startswith(prefix)])

    def ping(self) -> None:
        self._enter()

    def close(self) -> None:
        return None


def test_an_external_connector_that_raises_is_marked_down_and_fails_fast(registry):
    registry.register("remote_connector", "flaky", FlakyConnector, package="flaky-pkg")
    connector = assembly.build_remote_connector(plan_store(load(remote_url="flaky://nowhere")))
    assert isinstance(connector, GuardedConnector)
    # A long first backoff, so that "down" cannot expire while the test looks at it.
    remote = RemoteBackend(connector, backoff_initial=60)
    try:
        inner = connector.inner
        assert remote.put(b"k", Block.from_bytes(b"v"))
        inner.broken = True
        assert remote.get(b"k") is None  # raised: answered as a miss, not an error
        assert remote.stats()["health"] == "down"
        calls = inner.calls
        # Down: these return at once without calling the connector.
        assert remote.contains_many([b"k"]) == [False]
        assert remote.put(b"k2", Block.from_bytes(b"v2")) is False
        assert remote.get(b"k") is None
        assert inner.calls == calls
        stats = remote.stats()
        assert stats["skipped_while_down"] == 3 and stats["up"] == 0
        assert "RuntimeError: backend on fire" in stats["last_error"]
        assert stats["plugin_errors"] == 1
        inner.broken = False
        remote.health.retry_at = time.monotonic()  # as if the backoff delay had passed
        assert remote.probe()
        assert remote.get(b"k").tobytes() == b"v"
        assert remote.stats()["health"] == "ok"
    finally:
        remote.close()


class ShortConnector(FlakyConnector):
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return []  # one value per key is the contract


def test_a_connector_that_answers_the_wrong_shape_is_marked_down(registry):
    registry.register("remote_connector", "short", ShortConnector, package="short-pkg")
    remote, tiers = remote_tier(load(remote_url="short://x"))
    try:
        assert remote.get_many([b"a", b"b"]) == [None, None]
        assert "returned 0 values for 2 keys" in remote.stats()["last_error"]
    finally:
        close_all(tiers)


def test_an_external_connector_failing_on_startup_is_disabled_unless_strict(
    example_installed, tmp_path
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url = f"folder://{blocker}/kv"  # on_startup cannot create the folder
    tiers = build_tiers(load(remote_url=url, extra_config=FOLDER), 0)
    try:
        assert [t.name for t in tiers] == ["cpu"]  # the daemon runs without its remote tier
        state = startup.extension_states()["folder"]
        assert state["state"] == "disabled" and "a-file" in state["error"]
    finally:
        close_all(tiers)
    strict = load(remote_url=url, extra_config=FOLDER, strict_plugins=True)
    with pytest.raises(PluginStartupError, match=r"'folder'.*strict_plugins"):
        build_tiers(strict, 0)


def test_lifecycle_runs_behind_the_remote_backend(example_installed, tmp_path):
    remote, tiers = remote_tier(
        load(
            remote_url=f"folder://{tmp_path}/kv",
            extra_config={**FOLDER, "external_connector.folder.fsync": True},
        )
    )
    try:
        assert remote.connector.inner.config.fsync is True  # typed options reached the class
        assert (tmp_path / "kv").is_dir()  # on_startup ran
        remote.put(b"k", Block.from_bytes(b"v"))
        assert remote.stats()["plugin"] == {"root": str(tmp_path / "kv"), "puts": 1, "gets": 0}
        assert startup.extension_states()["folder"]["metrics"]["puts"] == 1
    finally:
        close_all(tiers)


def test_a_connector_without_the_lifecycle_base_refuses_options(registry):
    extra = {
        "external_connector.flaky.module_path": __name__,
        "external_connector.flaky.class_name": "FlakyConnector",
        "external_connector.flaky.colour": "red",
    }
    with pytest.raises(config.ConfigError, match="takes no options") as info:
        checked(remote_url="flaky://x", extra_config=extra)
    assert info.value.key == "extra_config.external_connector.flaky.colour"
