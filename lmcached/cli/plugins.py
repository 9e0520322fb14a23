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
from collections.abc import Sequence
from typing import TextIO

from lmcached.cli.commands import CommandTable, add_config_argument


def register(commands: CommandTable) -> None:
    """Add `plugins`."""
    parser = commands.add(
        "plugins",
        run,
        "list, show and validate extensions (backends, connectors, codecs, policies, general "
        "plugins, stat loggers)",
        description="List, show and validate the entries of lmcached's plugin registry.",
        config_help=None,  # its own --config FILE, below
    )
    configure_parser(parser)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    # Named without importing the registry: every `lmcached` command builds this parser, and
    # only the registry modules, not the store's, may load in the scheduler process.
    parser.add_argument(
        "category",
        nargs="?",
        help="one of: storage_backend, remote_connector, codec, eviction_policy, general, "
        "stat_logger",
    )
    parser.add_argument("name", nargs="?", help="an entry's name (a URL scheme for connectors)")
    parser.add_argument("--packages", action="store_true", help="list contributing packages")
    parser.add_argument(
        "--validate", action="store_true", help="import and check entries; exit 1 if any is broken"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_argument(
        parser, "also register the file's external_backends/connectors", metavar="FILE"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run ``lmcached plugins`` with parsed arguments; return the exit status."""
    from lmcached.cli import plugin_listing

    return plugin_listing.run(args, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Run as ``python -m lmcached.cli.plugins`` (same arguments as ``lmcached plugins``)."""
    parser = argparse.ArgumentParser(prog="lmcached plugins")
    configure_parser(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
