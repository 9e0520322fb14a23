"""What `lmcached plugins` shows: the registry's entries as tables or JSON, and `--validate`.

Loaded only when that command runs (through :mod:`lmcached.cli.plugins`), so no other command
imports the listing code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

import structlog

from lmcached.cli.commands import print_json
from lmcached.cli.status_view import table_lines
from lmcached.errors import ConfigError
from lmcached.extensions import sources
from lmcached.extensions.registry import CATEGORIES, PluginError, PluginRegistry, get_registry

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``lmcached plugins`` with parsed arguments; return the exit status."""
    out = out or sys.stdout
    _quiet_logs()
    registry = get_registry()
    report = sources.load(registry)
    if args.config:
        from lmcached import config as config_mod
        from lmcached.daemon.assembly import check_store_config

        try:
            # Checking the store registers the config's declarations (and imports them).
            check_store_config(config_mod.load(args.config))
        except ConfigError as exc:
            print(f"lmcached plugins: {exc}", file=sys.stderr)
            return EXIT_BROKEN if args.validate else EXIT_USAGE
    if args.category is not None and args.category not in CATEGORIES:
        print(
            f"lmcached plugins: unknown category {args.category!r}; known: {', '.join(CATEGORIES)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.packages:
        return _packages(registry, args, out)
    if args.validate:
        return _validate(registry, args, report, out)
    if args.name is not None:
        return _show(registry, args, out)
    return _list(registry, args, out)


def _list(registry: PluginRegistry, args: argparse.Namespace, out: TextIO) -> int:
    cats = [args.category] if args.category else list(CATEGORIES)
    if args.json:
        data = {
            c: [
                dict(e.as_dict(), shadowed=len(registry.shadowed(c, e.name)))
                for e in registry.iter_entries(c)
            ]
            for c in cats
        }
        print_json(data, file=out)
        return EXIT_OK
    for i, c in enumerate(cats):
        cat = CATEGORIES[c]
        if i:
            out.write("\n")
        out.write(f"{c} [{cat.plugin_type}]: {cat.description}\n")
        rows = []
        for e in registry.iter_entries(c):
            n_shadowed = len(registry.shadowed(c, e.name))
            name = e.name + (f" (+{n_shadowed} shadowed)" if n_shadowed else "")
            rows.append(
                [name, str(e.priority), e.package, e.class_path, _first_line(e.description)]
            )
        if rows:
            key = "SCHEME" if cat.keyed_by == "URL scheme" else "NAME"
            _table(out, [key, "PRIO", "PACKAGE", "CLASS", "DESCRIPTION"], rows)
        else:
            out.write("  (none registered)\n")
    return EXIT_OK


def _show(registry: PluginRegistry, args: argparse.Namespace, out: TextIO) -> int:
    if args.category is None:
        print("lmcached plugins: give a category before a name", file=sys.stderr)
        return EXIT_USAGE
    try:
        entry = registry.get_entry(args.category, args.name)
    except PluginError as exc:
        print(f"lmcached plugins: {exc}", file=sys.stderr)
        return EXIT_USAGE
    shadowed = registry.shadowed(entry.category, entry.name)
    if args.json:
        data = entry.as_dict()
        data["interface"] = CATEGORIES[entry.category].interface
        data["shadowed"] = [s.as_dict() for s in shadowed]
        print_json(data, file=out)
        return EXIT_OK
    kind = "built-in" if entry.builtin else "external"
    lines = [
        ("class", entry.class_path),
        ("package", f"{entry.package} ({kind})"),
        ("priority", str(entry.priority)),
        ("source", entry.source),
        ("interface", CATEGORIES[entry.category].interface),
        ("description", entry.description or "-"),
    ]
    out.write(f"{entry.category}:{entry.name}\n")
    for label, value in lines:
        out.write(f"  {label + ':':<13}{value}\n")
    if entry.metadata:
        out.write("  metadata:\n")
        for k, v in entry.metadata.items():
            out.write(f"    {k}: {json.dumps(v)}\n")
    if shadowed:
        out.write("  shadowed (reachable by class path):\n")
        for s in shadowed:
            out.write(f"    {s.class_path}  (package {s.package}, priority {s.priority})\n")
    return EXIT_OK


def _packages(registry: PluginRegistry, args: argparse.Namespace, out: TextIO) -> int:
    pkgs = registry.packages()
    if args.json:
        print_json(pkgs, file=out)
        return EXIT_OK
    rows = []
    for p in pkgs:
        version = p["version"]
        if p["package"] == "lmcached":
            from lmcached.version import __version__

            version = __version__
        rows.append([p["package"], version or "-", str(p["entries"]), ", ".join(p["sources"])])
    _table(out, ["PACKAGE", "VERSION", "ENTRIES", "SOURCES"], rows)
    return EXIT_OK


def _validate(
    registry: PluginRegistry,
    args: argparse.Namespace,
    report: sources.LoadReport,
    out: TextIO,
) -> int:
    issues = registry.validate(args.category, args.name)
    checked = [
        e
        for e in registry.iter_all_entries(args.category)
        if args.name is None or e.name == args.name
    ]
    failed_packages = dict(report.failed) if args.category is None else {}
    ok = not issues and not failed_packages
    if args.json:
        print_json(
            {
                "ok": ok,
                "checked": len(checked),
                "issues": [vars(i) for i in issues],
                "failed_packages": failed_packages,
                "skipped_by_allow_list": list(report.skipped),
            },
            file=out,
        )
        return EXIT_OK if ok else EXIT_BROKEN
    for name, error in failed_packages.items():
        out.write(f"BROKEN  entry point {name}: {error}\n")
    for issue in issues:
        out.write(f"BROKEN  {issue}\n")
    broken = {(i.category, i.name, i.class_path) for i in issues}
    for e in checked:
        if (e.category, e.name, e.class_path) not in broken:
            out.write(f"ok      {e.category}:{e.name} ({e.class_path})\n")
    total = len(issues) + len(failed_packages)
    out.write(
        f"{len(checked)} entries checked, {total} broken\n"
        if total
        else f"{len(checked)} entries ok\n"
    )
    return EXIT_OK if ok else EXIT_BROKEN


def _quiet_logs() -> None:
    # stdout carries the table or the JSON: log lines (warnings and up) go to stderr, unless
    # the caller already configured structlog.
    if not structlog.is_configured():
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        )


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= 60 else line[:57] + "..."


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    for line in table_lines(header, rows):
        out.write(line + "\n")
