"""The `lmcached` command line: build the parser from the command modules, and dispatch."""

from __future__ import annotations

import argparse
import sys

from lmcached.cli import bench, check, config, daemon, keygen, plugins, reload
from lmcached.cli.commands import CommandTable
from lmcached.errors import ConfigError, LMCachedError, LMCachedUnavailable
from lmcached.version import PROTOCOL_VERSION, __version__

# Each module adds its commands through register(CommandTable); this order is `--help`'s order.
COMMAND_MODULES = (daemon, config, bench, reload, check, plugins, keygen)


def build_parser() -> argparse.ArgumentParser:
    """Return the `lmcached` parser with every command module's commands."""
    parser = argparse.ArgumentParser(prog="lmcached", description="KV-cache daemon for LLM serving")
    parser.add_argument(
        "--version",
        action="version",
        version=f"lmcached {__version__} (protocol {PROTOCOL_VERSION})",
    )
    commands = CommandTable(parser.add_subparsers(dest="command", required=True))
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `lmcached` command; return its exit status (2 config error, 3 no daemon)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"lmcached: config error: {exc}", file=sys.stderr)
        return 2
    except LMCachedUnavailable as exc:
        print(f"lmcached: daemon unavailable: {exc}", file=sys.stderr)
        return 3
    except LMCachedError as exc:
        print(f"lmcached: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
