"""The import graph of the lmcached package, parsed once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

import lmcached

from .import_graph import ImportGraph


@pytest.fixture(scope="session")
def lmcached_graph() -> ImportGraph:
    return ImportGraph(Path(lmcached.__file__).parent)
