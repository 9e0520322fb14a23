"""The lmcached package has no import cycles.

Every import counts, wherever it is written (see ``import_graph``):

- at module level;
- inside a function: a lazy import hides a cycle from the interpreter until that function
  runs, it does not remove the dependency;
- under ``if TYPE_CHECKING:``: the two modules still know each other's types, and a cycle
  kept alive only by annotations is one refactor away from a real one (``daemon.service`` ↔
  ``daemon.scheduler`` was such a pair: TYPE_CHECKING one way, a function-level import back).

A failure lists each strongly connected component, covered by shortest cycles printed as
import paths with the line and kind of every import, so the edge to cut is visible.
"""

from __future__ import annotations

import pytest

from .import_graph import ImportGraph


def test_the_package_has_no_import_cycles(lmcached_graph: ImportGraph) -> None:
    report = []
    for component in lmcached_graph.cycles():
        report.append(f"cycle among {len(component)} modules: {', '.join(component)}")
        for cycle in lmcached_graph.describe_cycles(component):
            report.extend(f"    {step}" for step in cycle)
            report.append("")
    if report:
        pytest.fail("import cycles:\n" + "\n".join(report), pytrace=False)
