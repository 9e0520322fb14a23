"""The import-graph reader sees every kind of import the architecture tests rely on."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .import_graph import IN_FUNCTION, MODULE_LEVEL, TYPE_CHECKING_ONLY, ImportGraph


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root / "pkg"


def test_cycle_through_a_lazy_import_and_a_type_checking_import_is_found(tmp_path: Path) -> None:
    graph = ImportGraph(
        write_package(
            tmp_path,
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from pkg import b\n",
                "pkg/b.py": "def f():\n    from . import c\n",
                "pkg/c.py": """\
                    from typing import TYPE_CHECKING
                    if TYPE_CHECKING:
                        from pkg.a import Thing
                    else:
                        import json
                    """,
                "pkg/d.py": "import pkg.a\n",
            },
        )
    )
    assert graph.cycles() == [["pkg.a", "pkg.b", "pkg.c"]]
    (cycle,) = graph.describe_cycles(["pkg.a", "pkg.b", "pkg.c"])
    assert cycle == [
        f"pkg.a -> pkg.b (line 1, {MODULE_LEVEL})",
        f"pkg.b -> pkg.c (line 2, {IN_FUNCTION} f())",
        f"pkg.c -> pkg.a (line 3, {TYPE_CHECKING_ONLY})",
    ]


def test_every_module_of_one_cycle_is_printed_in_some_path(tmp_path: Path) -> None:
    # Two cycles sharing pkg.hub: one strongly connected component, two printed paths.
    graph = ImportGraph(
        write_package(
            tmp_path,
            {
                "pkg/__init__.py": "",
                "pkg/hub.py": "from pkg import left, right\n",
                "pkg/left.py": "from pkg.hub import X\n",
                "pkg/right.py": "from .hub import X\n",
            },
        )
    )
    (component,) = graph.cycles()
    cycles = graph.describe_cycles(component)
    assert len(cycles) == 2
    printed = "\n".join(step for cycle in cycles for step in cycle)
    for module in component:
        assert module in printed


def test_reach_follows_parent_packages_relative_imports_and_names_from_packages(
    tmp_path: Path,
) -> None:
    graph = ImportGraph(
        write_package(
            tmp_path,
            {
                "pkg/__init__.py": "import pkg.heavy\n",
                "pkg/heavy.py": "",
                "pkg/client.py": "from pkg.sub.leaf import f\n",
                "pkg/sub/__init__.py": "from .wire import encode\n",
                "pkg/sub/wire.py": "from ..util import helper\n",
                "pkg/sub/leaf.py": "",
                "pkg/util.py": "from pkg.sub import encode\n",
            },
        )
    )
    assert graph.edges["pkg.util"].keys() == {"pkg.sub"}
    reached = graph.reach(["pkg.client"])
    # pkg/sub/__init__.py runs on the way to pkg.sub.leaf; the top package is left out.
    assert set(reached) == {"pkg.client", "pkg.sub.leaf", "pkg.sub", "pkg.sub.wire", "pkg.util"}
    assert reached["pkg.util"] == [
        "pkg.client -> pkg.sub.leaf (line 1, module level)",
        "pkg.sub is the package of pkg.sub.leaf",
        "pkg.sub -> pkg.sub.wire (line 1, module level)",
        "pkg.sub.wire -> pkg.util (line 1, module level)",
    ]
