"""The import graph of a package, read from its source with ``ast`` (nothing is imported).

Every ``import``/``from ... import`` statement of every module is an edge, wherever it sits: at
module level, inside a function (a lazy import still runs the moment that function does) and
under ``if TYPE_CHECKING:`` (the types still tie the two modules together, and such an import
is one refactor away from a real one). Each edge remembers its line and which of those three
kinds it is, so that a failure message says where to cut.

``from pkg import name`` is an edge to ``pkg.name`` when that is a module of the package, and
to ``pkg`` otherwise. An import of ``pkg.sub.mod`` also runs ``pkg/sub/__init__.py``; the
reachability walk (not the cycle search) follows those parent packages too, except the top
package, whose ``__init__`` every module of the package loads anyway. Imports spelled as
strings (``importlib.import_module(name)``, entry points) are invisible here; the dynamic
checks in the layering tests cover what actually ends up in ``sys.modules``.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MODULE_LEVEL = "module level"
IN_FUNCTION = "in function"
TYPE_CHECKING_ONLY = "TYPE_CHECKING"
# When one module imports another several times, the edge keeps the most eager import.
_EAGERNESS = {MODULE_LEVEL: 0, IN_FUNCTION: 1, TYPE_CHECKING_ONLY: 2}


@dataclass(frozen=True)
class Import:
    """One import statement of ``importer`` that loads ``target``."""

    importer: str
    target: str
    line: int
    kind: str
    # Dotted name of the enclosing function (``Class.method``), None at module level.
    scope: str | None

    def describe(self) -> str:
        where = f"line {self.line}, {self.kind}"
        if self.kind == IN_FUNCTION:
            where += f" {self.scope}()"
        elif self.scope is not None:
            where += f" in {self.scope}"
        return f"{self.importer} -> {self.target} ({where})"


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, graph: ImportGraph, module: str, package: str) -> None:
        self.graph = graph
        self.module = module
        self.package = package  # the package relative imports are resolved against
        self.scopes: list[str] = []
        self.functions = 0  # enclosing defs; a class body alone runs at import time
        self.type_checking = 0
        self.imports: list[Import] = []

    def _kind(self) -> str:
        if self.type_checking:
            return TYPE_CHECKING_ONLY
        return IN_FUNCTION if self.functions else MODULE_LEVEL

    def _add(self, target: str, node: ast.stmt) -> None:
        if target in self.graph.modules and target != self.module:
            scope = ".".join(self.scopes) or None
            imp = Import(self.module, target, node.lineno, self._kind(), scope)
            if imp not in self.imports:  # `from m import a, b` is one import of m
                self.imports.append(imp)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scopes.append(node.name)
        self.generic_visit(node)
        self.scopes.pop()

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scopes.append(node.name)
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for stmt in node.body:
                self.visit(stmt)
            self.type_checking -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            # `import a.b.c` loads a, a.b and a.b.c; the deepest module of ours is the target.
            name = alias.name
            while name and name not in self.graph.modules:
                name = name.rpartition(".")[0]
            if name:
                self._add(name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = parts[: len(parts) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            self._add(submodule if submodule in self.graph.modules else source, node)


class ImportGraph:
    """Modules of one package and the imports among them."""

    def __init__(self, package_dir: Path) -> None:
        self.package = package_dir.name
        self.modules: dict[str, Path] = {}
        for path in sorted(package_dir.rglob("*.py")):
            parts = path.relative_to(package_dir.parent).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            self.modules[".".join(parts)] = path
        # importer -> target -> the most eager import of target by importer
        self.edges: dict[str, dict[str, Import]] = {name: {} for name in self.modules}
        # Every import statement, for rules that look at where inside a module it sits.
        self.imports: dict[str, list[Import]] = {}
        for name, path in self.modules.items():
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            collector = _ImportCollector(self, name, package)
            collector.visit(ast.parse(path.read_text(), filename=str(path)))
            self.imports[name] = collector.imports
            for imp in collector.imports:
                known = self.edges[name].get(imp.target)
                if known is None or _EAGERNESS[imp.kind] < _EAGERNESS[known.kind]:
                    self.edges[name][imp.target] = imp

    def _parents(self, module: str) -> Iterable[str]:
        """Packages whose ``__init__`` importing ``module`` runs, the top package excepted."""
        parts = module.split(".")
        for depth in range(2, len(parts)):
            yield ".".join(parts[:depth])

    def followed(
        self, module: str, only: dict[str, list[Import]] | None = None
    ) -> Iterable[Import]:
        """Return the imports of ``module`` a walk follows: ``only[module]`` if given, else all."""
        if only is not None and module in only:
            return only[module]
        return self.edges[module].values()

    def reach(
        self,
        modules: Iterable[str],
        only: dict[str, list[Import]] | None = None,
        origin: str | None = None,
    ) -> dict[str, list[str]]:
        """Map every module that loading ``modules`` can load to how it gets there.

        The value is the chain of steps (one line each, the first one ``origin``'s) that leads
        to that module. ``only`` narrows what some modules are taken to import (say, leaving
        out the bodies of functions known not to run).
        """
        paths: dict[str, list[str]] = {}
        queue: deque[str] = deque()

        def visit(module: str, path: list[str]) -> None:
            if module not in paths:
                paths[module] = path
                queue.append(module)

        for module in modules:
            visit(module, [f"{origin} loads {module}"] if origin else [])
        while queue:
            module = queue.popleft()
            for parent in self._parents(module):
                visit(parent, [*paths[module], f"{parent} is the package of {module}"])
            for imp in self.followed(module, only):
                visit(imp.target, [*paths[module], imp.describe()])
        return paths

    def cycles(self) -> list[list[str]]:
        """Return the strongly connected components with more than one module, sorted."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []
        # Iterative Tarjan: a deep package would overflow the recursion limit.
        work: list[tuple[str, Iterator[str]]] = []

        def open_(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on_stack.add(v)
            work.append((v, iter(sorted(self.edges[v]))))

        for start in self.modules:
            if start in index:
                continue
            open_(start)
            while work:
                v, successors = work[-1]
                for w in successors:
                    if w not in index:
                        open_(w)
                        break
                    if w in on_stack:
                        low[v] = min(low[v], index[w])
                else:
                    work.pop()
                    if work:
                        low[work[-1][0]] = min(low[work[-1][0]], low[v])
                    if low[v] == index[v]:
                        component: list[str] = []
                        while True:
                            w = stack.pop()
                            on_stack.discard(w)
                            component.append(w)
                            if w == v:
                                break
                        if len(component) > 1:
                            found.append(sorted(component))
        return sorted(found)

    def _shortest_cycle(self, start: str, within: set[str]) -> list[Import]:
        came_from: dict[str, Import] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            for w, imp in sorted(self.edges[v].items()):
                if w not in within:
                    continue
                if w == start:
                    steps = [imp]
                    while v != start:
                        steps.append(came_from[v])
                        v = came_from[v].importer
                    return steps[::-1]
                if w not in came_from:
                    came_from[w] = imp
                    queue.append(w)
        raise AssertionError(f"{start} is in no cycle within {sorted(within)}")

    def describe_cycles(self, component: list[str]) -> list[list[str]]:
        """Cover a strongly connected component with shortest cycles, one per uncovered module."""
        within = set(component)
        covered: set[str] = set()
        cycles = []
        for module in component:
            if module in covered:
                continue
            steps = self._shortest_cycle(module, within)
            covered.update(imp.importer for imp in steps)
            cycles.append([imp.describe() for imp in steps])
        return cycles
