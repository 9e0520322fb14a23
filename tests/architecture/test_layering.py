"""Which parts of lmcached may load which: the client never loads server code, config is a leaf,
the scheduler process never loads the storage side.

Each rule is checked twice:

- statically, on the import graph (``import_graph``: every import, including those inside
  functions and under ``if TYPE_CHECKING:``, followed transitively), so that a lazy import in
  a rarely taken branch is caught too; a failure prints the chain of imports that gets there;
- dynamically where it is cheap: a fresh interpreter does what a real process does first and
  the test looks at ``sys.modules``, which also sees imports spelled as strings.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .import_graph import Import, ImportGraph

REPO = Path(__file__).resolve().parents[2]

# Packages that only the daemon's processes (and its operator tools) may load.
SERVER_SIDE = (
    "lmcached.storage",
    "lmcached.extensions",
    "lmcached.supervision",
    "lmcached.codecs",
    "lmcached.daemon",
    "lmcached.cli",
    "lmcached.bench",
)


@dataclass(frozen=True)
class Rule:
    """Modules matching ``roots`` (``pkg.*`` = pkg and everything under it) never load
    any module in or under ``forbidden``."""

    name: str
    roots: tuple[str, ...]
    forbidden: tuple[str, ...]
    # Python run in a fresh interpreter; it must leave no forbidden module in sys.modules.
    dynamic: str | None = None

    def root_modules(self, graph: ImportGraph) -> list[str]:
        modules = []
        for pattern in self.roots:
            if pattern.endswith(".*"):
                base = pattern[:-2]
                matched = [m for m in graph.modules if m == base or m.startswith(base + ".")]
            else:
                matched = [pattern] if pattern in graph.modules else []
            assert matched, f"rule {self.name!r}: no module matches {pattern!r}"
            modules.extend(matched)
        return modules

    def is_forbidden(self, module: str) -> bool:
        return any(module == f or module.startswith(f + ".") for f in self.forbidden)


RULES = [
    Rule(
        "client side",
        roots=(
            "lmcached",  # `import lmcached` / `from lmcached import Client`
            "lmcached.client.*",
            "lmcached.aio",  # the asyncio client
            "lmcached.integrations.vllm",
            "lmcached.integrations.kv_blocks",
            "lmcached.integrations.daemon_link",
            # The connector maps LMCache's keys with it; it imports nothing of lmcached.
            "lmcached.config_lmcache",
        ),
        forbidden=SERVER_SIDE,
        # The vLLM connector itself needs vllm installed; its two helpers do not.
        dynamic=(
            "import lmcached\n"
            "from lmcached import Client\n"
            "import lmcached.aio\n"
            "import lmcached.integrations.kv_blocks, lmcached.integrations.daemon_link\n"
            "import lmcached.config_lmcache\n"
        ),
    ),
    Rule(
        "config is a leaf",
        roots=("lmcached.config.*", "lmcached.config_lmcache"),
        forbidden=(
            "lmcached.storage",
            "lmcached.extensions",
            "lmcached.supervision",
            "lmcached.codecs",
            "lmcached.daemon",
            "lmcached.client",
        ),
        dynamic="import lmcached.config\n",
    ),
]

# What the scheduler process must never load: the worker side of the daemon. The registry
# itself (and the general plugins and stat loggers it runs in every process) is allowed; the
# extension modules that wrap or build a store are not.
WORKER_SIDE = (
    "lmcached.daemon.worker",
    "lmcached.daemon.assembly",
    "lmcached.storage",
    "lmcached.codecs",
    "lmcached.extensions.guard",
    "lmcached.extensions.interfaces",
    "lmcached.extensions.startup",
)


def crossings(
    graph: ImportGraph,
    rule: Rule,
    reached: dict[str, list[str]],
    only: dict[str, list[Import]] | None = None,
) -> str:
    """Describe every import from an allowed module into a forbidden one: the edges to cut.

    Each comes with the chain of imports that makes the allowed module reachable.
    """
    blocks = []
    for module in sorted(m for m in reached if not rule.is_forbidden(m)):
        for imp in graph.followed(module, only):
            if rule.is_forbidden(imp.target):
                chain = [*reached[module], imp.describe()]
                blocks.append("\n".join(f"    {step}" for step in chain))
    if not blocks:
        return ""
    forbidden = sorted(m for m in reached if rule.is_forbidden(m))
    return (
        f"{rule.name}: {', '.join(rule.roots)} reach {len(forbidden)} forbidden modules "
        f"({', '.join(forbidden)}) through {len(blocks)} imports:\n" + "\n\n".join(blocks)
    )


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_static_layering(rule: Rule, lmcached_graph: ImportGraph) -> None:
    reached = lmcached_graph.reach(rule.root_modules(lmcached_graph))
    found = crossings(lmcached_graph, rule, reached)
    if found:
        pytest.fail(found, pytrace=False)


def modules_loaded_by(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter and return the names in its sys.modules."""
    probe = code + "import json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded: list[str] = json.loads(out.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("rule", [r for r in RULES if r.dynamic], ids=lambda r: r.name)
def test_dynamic_layering(rule: Rule) -> None:
    assert rule.dynamic is not None
    loaded = [m for m in modules_loaded_by(rule.dynamic) if rule.is_forbidden(m)]
    assert loaded == [], f"{rule.name}: {rule.dynamic!r} loaded {loaded}"


# -- the scheduler process -------------------------------------------------------------------


def console_script() -> tuple[str, str]:
    """Return the module and function behind the `lmcached` command (pyproject.toml)."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'^lmcached\s*=\s*"([\w.]+):(\w+)"', text, re.MULTILINE)
    assert match, "pyproject.toml [project.scripts] has no `lmcached` entry"
    return match[1], match[2]


def command_handlers(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, Callable[..., object]]]:
    """Yield (command words, handler) for every subcommand with a ``func`` default."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = (*prefix, name)
                func = sub.get_default("func")
                if func is not None:
                    yield " ".join(words), func
                yield from command_handlers(sub, words)


def start_command_reach(graph: ImportGraph) -> tuple[dict[str, list[str]], dict[str, list[Import]]]:
    """Map what `lmcached start` can load to how it gets there.

    That is the console script's module and the start handler's module, each with everything
    it imports except inside the body of another command's handler (that body only runs for
    its own command), followed transitively. The scheduler module, which the start handler
    imports, is reached on the way. Also returns the narrowed imports of the modules that
    define command handlers.
    """
    entry, _ = console_script()
    cli = importlib.import_module(entry)
    handlers = dict(command_handlers(cli.build_parser()))
    start = handlers.pop("start")
    other = {(f.__module__, f.__qualname__) for f in handlers.values()}

    def runs_on_start(imp: Import) -> bool:
        return imp.scope is None or not any(
            module == imp.importer and (imp.scope == name or imp.scope.startswith(name + "."))
            for module, name in other
        )

    with_handlers = {module for module, _ in other} | {entry, start.__module__}
    only = {m: [imp for imp in graph.imports[m] if runs_on_start(imp)] for m in with_handlers}
    reached = graph.reach([entry, start.__module__], only=only, origin="`lmcached start`")
    return reached, only


def test_scheduler_never_reaches_the_worker_side(lmcached_graph: ImportGraph) -> None:
    rule = Rule("scheduler", roots=("lmcached.daemon.scheduler",), forbidden=WORKER_SIDE)
    reached = lmcached_graph.reach(rule.root_modules(lmcached_graph))
    found = crossings(lmcached_graph, rule, reached)
    if found:
        pytest.fail(found, pytrace=False)


def test_lmcached_start_never_reaches_the_worker_side(lmcached_graph: ImportGraph) -> None:
    rule = Rule(
        "`lmcached start`",
        roots=("the console script's module and the start handler's",),
        forbidden=WORKER_SIDE,
    )
    reached, only = start_command_reach(lmcached_graph)
    found = crossings(lmcached_graph, rule, reached, only)
    if found:
        pytest.fail(found, pytrace=False)


def test_scheduler_process_loads_no_worker_side_module_before_running() -> None:
    # What the `lmcached start` process has loaded when it hands over to scheduler.run().
    entry, _ = console_script()
    code = (
        "import lmcached.daemon.scheduler\n"
        f"from {entry} import build_parser\n"
        "build_parser().parse_args(['start'])\n"
    )
    rule = Rule("`lmcached start`", roots=(), forbidden=WORKER_SIDE)
    loaded = [m for m in modules_loaded_by(code) if rule.is_forbidden(m)]
    assert loaded == [], f"`lmcached start` loaded {loaded}"
