"""``lmcached plugins``: list, show and validate the registry's entries.

::

    lmcached plugins                       every category with its entries
    lmcached plugins codec                 one category
    lmcached plugins codec zstd            one entry: class, package, priority, metadata, shadowed
    lmcached plugins --packages            packages that contributed entries, with versions
    lmcached plugins --validate            import and check every entry; exit 1 naming the broken
    lmcached plugins ... --json            the same as JSON
    lmcached plugins ... --config FILE     include the config's LMCache-style declarations

Also runs as ``python -m lmcached.cli.plugins``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import structlog

from lmcached.cli.commands import CommandTable, print_json
from lmcached.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lmcached.extensions import sources
    from lmcached.extensions.registry import PluginRegistry

EXIT_OK = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2


def register(commands: CommandTable) -> None:
    """Add `plugins`."""
    parser = commands.add(
        "plugins",
        run,
        "list, show and validate extensions (backends, connectors, codecs, policies)",
        description="List, show and validate the entries of lmcached's plugin registry.",
        config_help=None,  # its own --config FILE, below
    )
    configure_parser(parser)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    # Named without importing the registry: every `lmcached` command builds this parser, and
    # the daemon's scheduler process must not load lmcached.extensions.
    parser.add_argument(
        "category",
        nargs="?",
        help="one of: storage_backend, remote_connector, codec, eviction_policy",
    )
    parser.add_argument("name", nargs="?", help="an entry's name (a URL scheme for connectors)")
    parser.add_argument("--packages", action="store_true", help="list contributing packages")
    parser.add_argument(
        "--validate", action="store_true", help="import and check entries; exit 1 if any is broken"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--config", metavar="FILE", help="also register the file's external_backends/connectors"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``lmcached plugins`` with parsed arguments; return the exit status."""
    out = out or sys.stdout
    from lmcached.extensions import sources
    from lmcached.extensions.registry import CATEGORIES, get_registry

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
    from lmcached.extensions.registry import CATEGORIES

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
    from lmcached.extensions.registry import CATEGORIES, PluginError

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


def status_lines(status: dict[str, Any]) -> list[str]:
    """Return the plugin section of ``lmcached status``: each plugin's state per worker."""
    rows = []
    for w in status.get("workers", []):
        stats = w.get("stats") or {}
        store = stats.get("store") or {}
        for name, state in sorted((stats.get("extensions") or {}).items()):
            tier = store.get(name) or {}
            metrics = state.get("metrics") or tier.get("plugin") or {}
            shown = ", ".join(f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float)))
            rows.append(
                [
                    str(w.get("id")),
                    name,
                    state.get("category", "?"),
                    state.get("state", "?"),
                    str(tier.get("plugin_errors", 0)),
                    state.get("error") or shown or "-",
                ]
            )
    if not rows:
        return []
    return ["", *_table_lines(["WORKER", "PLUGIN", "CATEGORY", "STATE", "ERRORS", "DETAIL"], rows)]


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


def _table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    for line in _table_lines(header, rows):
        out.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run as ``python -m lmcached.cli.plugins`` (same arguments as ``lmcached plugins``)."""
    parser = argparse.ArgumentParser(prog="lmcached plugins")
    configure_parser(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
