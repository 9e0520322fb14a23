"""The registry: lazy import, interface checks, priority, shadowing, validation."""

from __future__ import annotations

import sys
import warnings

import pytest

from lmcached.codecs.base import Codec
from lmcached.extensions.registry import (
    PluginConflictWarning,
    PluginError,
    PluginNotFoundError,
    PluginRegistry,
    PluginValidationError,
)
from lmcached.storage.eviction import LRUPolicy


class LoudLRU(LRUPolicy):
    """A policy class used to shadow the built-in lru."""


class OtherLRU(LRUPolicy):
    """Another one, for ties."""


class NoDecode(Codec):
    def encode(self, data, meta=None):
        return bytes(data)


def test_builtins_come_from_the_manifest_and_validate():
    reg = PluginRegistry()
    assert set(reg.names("codec")) >= {"none", "zstd", "lz4", "int8"}
    assert reg.names("eviction_policy") == ["lru", "s3fifo"]
    entry = reg.get_entry("codec", "zstd")
    assert entry.builtin and entry.package == "lmcached"
    assert entry.source.endswith("builtin.yaml")
    assert reg.validate() == []


def test_registering_does_not_import_until_asked():
    reg = PluginRegistry(load_builtins=False)
    reg.register("codec", "lazy", "json.tool:main")  # json.tool is not imported by the suite
    sys.modules.pop("json.tool", None)
    assert "json.tool" not in sys.modules
    assert reg.validate(check_class=False) == []  # locates the module without importing it
    assert "json.tool" not in sys.modules
    with pytest.raises(PluginValidationError, match="is not a class"):
        reg.get_class("codec", "lazy")
    assert "json.tool" in sys.modules


def test_higher_priority_wins_and_the_loser_stays_reachable_by_class_path():
    reg = PluginRegistry()
    reg.register("eviction_policy", "lru", LoudLRU, priority=5, package="acme")
    assert reg.get_class("eviction_policy", "lru") is LoudLRU
    shadowed = reg.shadowed("eviction_policy", "lru")
    assert [e.class_path for e in shadowed] == ["lmcached.storage.eviction:LRUPolicy"]
    assert reg.get_class("eviction_policy", "lmcached.storage.eviction:LRUPolicy") is LRUPolicy
    # A lower-priority external package does not displace the winner.
    reg.register("eviction_policy", "lru", OtherLRU, priority=1, package="other")
    assert reg.get_class("eviction_policy", "lru") is LoudLRU


def test_external_beats_builtin_at_equal_priority():
    reg = PluginRegistry()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginConflictWarning)  # no warning for this rule
        reg.register("eviction_policy", "lru", LoudLRU, priority=0, package="acme")
    assert reg.get_entry("eviction_policy", "lru").package == "acme"


def test_first_registered_wins_a_tie_with_a_warning():
    reg = PluginRegistry()
    reg.register("eviction_policy", "tie", LoudLRU, package="a")
    with pytest.warns(PluginConflictWarning, match="first registered"):
        reg.register("eviction_policy", "tie", OtherLRU, package="b")
    assert reg.get_class("eviction_policy", "tie") is LoudLRU
    assert reg.get_class("eviction_policy", f"{__name__}:OtherLRU") is OtherLRU


def test_registering_the_same_manifest_twice_is_idempotent():
    reg = PluginRegistry()
    reg.register("codec", "x", "a.b:C", package="p")
    reg.register("codec", "x", "a.b:C", package="p")
    assert reg.shadowed("codec", "x") == []


def test_interface_check_names_the_missing_method():
    reg = PluginRegistry()
    reg.register("codec", "nodecode", NoDecode)
    with pytest.raises(PluginValidationError, match="missing decode"):
        reg.get_class("codec", "nodecode")
    issues = reg.validate("codec")
    assert [(i.name, "decode" in i.error) for i in issues] == [("nodecode", True)]


class DuckPolicy:  # an LMCache-style policy that does not subclass ours
    def on_insert(self, key, nbytes): ...
    def on_access(self, key): ...
    def on_remove(self, key): ...
    def victim(self): ...
    def __len__(self):
        return 0


class LameDuckPolicy:
    def on_insert(self, key, nbytes): ...
    def on_access(self, key): ...
    def on_remove(self, key): ...
    def __len__(self):
        return 0


def test_duck_typed_class_is_accepted_structurally():
    reg = PluginRegistry()
    reg.register("eviction_policy", "duck", DuckPolicy)
    assert reg.get_class("eviction_policy", "duck") is DuckPolicy
    reg.register("eviction_policy", "lame", LameDuckPolicy)
    with pytest.raises(PluginValidationError, match="missing victim"):
        reg.get_class("eviction_policy", "lame")


def test_bad_class_path_is_reported_with_the_import_error():
    reg = PluginRegistry()
    reg.register("codec", "gone", "no_such_pkg.codecs:Gone")
    issues = reg.validate()
    assert len(issues) == 1 and issues[0].name == "gone"
    assert "No module named 'no_such_pkg'" in issues[0].error
    assert "no_such_pkg" in reg.validate(check_class=False)[0].error


def test_bad_names_categories_and_paths_are_refused():
    reg = PluginRegistry()
    with pytest.raises(PluginNotFoundError, match="unknown category"):
        reg.register("transport", "x", "a:B")
    with pytest.raises(PluginError, match="not of the form"):
        reg.register("codec", "x", "a.b.C")
    with pytest.raises(PluginError, match="lowercase"):
        reg.register("codec", "Bad Name", "a:B")
    with pytest.raises(PluginError, match="URL scheme"):
        reg.register("remote_connector", "9p", "a:B")
    with pytest.raises(PluginNotFoundError, match="known: int8, lz4, none, zstd"):
        reg.get_entry("codec", "brotli")


def test_connector_schemes_are_case_insensitive():
    reg = PluginRegistry()
    reg.register("remote_connector", "FooDB", "a.b:C")
    assert reg.get_entry("remote_connector", "foodb").name == "foodb"
    assert reg.has("remote_connector", "FOODB")


def test_manifest_errors_name_the_manifest(tmp_path):
    reg = PluginRegistry()
    bad = tmp_path / "plugins.yaml"
    bad.write_text("schema_version: '1.0'\ntransport:\n  x: {class: 'a:B'}\n")
    with pytest.raises(PluginError, match="unknown category 'transport'"):
        reg.load_manifest(bad, package="p")
    bad.write_text("schema_version: '2.0'\n")
    with pytest.raises(PluginError, match=r"schema_version '2\.0'"):
        reg.load_manifest(bad, package="p")
    bad.write_text("codec:\n  x: {class: 'a:B', prio: 3}\n")
    with pytest.raises(PluginError, match=r"unknown fields \['prio'\]"):
        reg.load_manifest(bad, package="p")
