"""Fixtures for the extension tests: a fresh registry, the example plugin package installed
into a temporary target folder (never into the system), and a hand-built broken package."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

from lmcached.extensions import registry as registry_mod
from lmcached.extensions import startup

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PKG = REPO / "plugin_examples" / "extensions" / "lmcached-example-plugins"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[registry_mod.PluginRegistry]:
    """A process registry holding only the built-ins; restored afterwards."""
    monkeypatch.delenv("LMCACHED_PLUGINS", raising=False)
    fresh = registry_mod.reset_registry()
    yield fresh
    registry_mod.reset_registry()
    with startup._STATES_LOCK:
        startup._STATES.clear()


@pytest.fixture(scope="session")
def example_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lay out plugin_examples/extensions/lmcached-example-plugins as an installed distribution.

    The result is what ``pip install --target`` writes: the package folder plus a
    ``<name>-<version>.dist-info`` whose ``entry_points.txt`` is generated from the example's
    pyproject.toml, so discovery runs through importlib.metadata exactly as for a pip install.
    (Building a wheel would need the ``wheel`` package and, with build isolation, the network.)
    """
    target = tmp_path_factory.mktemp("example-plugins")
    project = tomllib.loads((EXAMPLE_PKG / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    shutil.copytree(
        EXAMPLE_PKG / "lmcached_example_plugins",
        target / "lmcached_example_plugins",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    info = target / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        f"Summary: {project['description']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines.extend(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (info / "top_level.txt").write_text("lmcached_example_plugins\n")
    (info / "INSTALLER").write_text("lmcached-tests\n")
    return target


@pytest.fixture
def example_installed(
    example_target: Path, registry: registry_mod.PluginRegistry, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Put the installed example package on sys.path (entry points become discoverable)."""
    monkeypatch.syspath_prepend(str(example_target))
    importlib.invalidate_caches()
    yield example_target
    for name in [m for m in sys.modules if m.startswith("lmcached_example_plugins")]:
        del sys.modules[name]


BROKEN_MANIFEST = """\
schema_version: "1.0"
codec:
  ghost:
    class: broken_plugins.nowhere:GhostCodec
    description: its module does not exist
  halfdone:
    class: broken_plugins.codecs:HalfCodec
    description: misses Codec.decode
eviction_policy:
  fine:
    class: broken_plugins.codecs:FinePolicy
"""

BROKEN_MODULE = """\
from lmcached.codecs.base import Codec
from lmcached.storage.eviction import LRUPolicy


class HalfCodec(Codec):
    def encode(self, data, meta=None):
        return bytes(data)


class FinePolicy(LRUPolicy):
    pass
"""


def write_distribution(
    site: Path, package: str, version: str, files: dict[str, str], entry_points: str
) -> Path:
    """Write ``package`` (``files`` by name) and its ``.dist-info`` into ``site``; return ``site``.

    What an install leaves behind, no more: importlib.metadata finds the distribution and its
    ``entry_points`` (an entry_points.txt, dedented here) once ``site`` is on the path.
    """
    pkg = site / package
    pkg.mkdir(parents=True)
    for name, text in files.items():
        (pkg / name).write_text(text)
    info = site / f"{package}-{version}.dist-info"
    info.mkdir()
    name = package.replace("_", "-")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return site


@pytest.fixture
def broken_dist(tmp_path: Path) -> Path:
    """A distribution folder written by hand: a manifest with two broken entries, one fine."""
    return write_distribution(
        tmp_path / "broken-site",
        "broken_plugins",
        "0.2",
        {"__init__.py": "", "plugins.yaml": BROKEN_MANIFEST, "codecs.py": BROKEN_MODULE},
        """\
        [lmcached.plugins]
        broken = broken_plugins:plugins.yaml
        """,
    )


@pytest.fixture
def run_cli():
    """Return a function running `lmcached plugins ...` as a real subprocess."""
    return _run_cli


def _run_cli(*args: str, pythonpath: list[Path] | None = None, env: dict | None = None):
    """Run `lmcached plugins ...` as a real subprocess; return the CompletedProcess."""
    environ = {k: v for k, v in os.environ.items() if k != "LMCACHED_PLUGINS"}
    paths = [str(p) for p in (pythonpath or [])] + [str(REPO)]
    environ["PYTHONPATH"] = os.pathsep.join(paths)
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lmcached", "plugins", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=60,
    )
