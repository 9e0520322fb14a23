"""The `lmcached` command line: build the parser from the command modules, and dispatch.

Exit statuses shared by every command (a command may add its own, documented in its help and in
docs/operations.md): 0 success, 1 an expected failure (one line on stderr), 2 a usage or config
error, 3 no daemon answers, 130 interrupted, 141 stdout closed early (``| head``).
"""

from __future__ import annotations

import argparse
import os
import sys

from lmcached.cli import bench, check, config, daemon, keygen, plugins, reload, service
from lmcached.cli.commands import CONFIG_ENV, CommandTable
from lmcached.errors import ConfigError, LMCachedError, LMCachedUnavailable
from lmcached.runtime import RuntimeDirError
from lmcached.version import PROTOCOL_VERSION, __version__

# Each module adds its commands through register(CommandTable); this order is `--help`'s order.
COMMAND_MODULES = (daemon, config, bench, reload, check, plugins, keygen, service)

# 128 + SIGPIPE: what a shell reports for a program killed by a closed pipe.
EXIT_BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    """Return the `lmcached` parser with every command module's commands."""
    parser = argparse.ArgumentParser(
        prog="lmcached",
        description="KV-cache daemon for LLM serving",
        epilog=f"Every --config/-c defaults to ${CONFIG_ENV} when it is set.",
    )
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
        code = _dispatch(args)
        # Output still buffered for a closed pipe fails here, not in the interpreter's exit.
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # `lmcached plugins --json | head`: the reader is gone, which is not an error to report.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"lmcached: config error: {exc}", file=sys.stderr)
        return 2
    except LMCachedUnavailable as exc:
        print(f"lmcached: daemon unavailable: {exc}", file=sys.stderr)
        return 3
    except (LMCachedError, RuntimeDirError) as exc:
        # RuntimeDirError: a second `start` for an instance that already runs.
        print(f"lmcached: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
