"""The command table of `lmcached`, and the helpers its commands share.

Every command module exposes ``register(commands: CommandTable)`` and adds its commands through
:meth:`CommandTable.add`; :mod:`lmcached.cli.main` lists the modules, builds the parser and
dispatches. This module imports none of the command modules, so any of them may import it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from lmcached import config as config_mod

Handler = Callable[[argparse.Namespace], int]

# Names the config file of every command that takes --config/-c, as systemd units and shell
# profiles set it once instead of repeating the flag.
CONFIG_ENV = "LMCACHED_CONFIG"
DEFAULT_CONFIG_HELP = (
    f"config file (default: ${CONFIG_ENV}, else built-in defaults plus LMCACHED_* env overrides)"
)
# Sentinel: a command's description is its help line.
SAME_AS_HELP = "same as help"


class CommandTable:
    """Add subcommands to one level of the `lmcached` parser (the top, or a group like `config`)."""

    def __init__(self, subparsers: Any, describe: bool = True) -> None:
        self._sub = subparsers
        # Top-level commands repeat their help line as the description of their own --help.
        self._describe = describe

    def add(
        self,
        name: str,
        handler: Handler,
        help: str,
        *,
        description: str | None = SAME_AS_HELP,
        config_help: str | None = DEFAULT_CONFIG_HELP,
        endpoint: bool = False,
    ) -> argparse.ArgumentParser:
        """Add command ``name`` run by ``handler``; return its parser for further arguments.

        ``config_help`` None: no ``--config`` (the command adds its own, or needs none).
        ``endpoint``: the command talks to a running daemon (``--endpoint``, ``--timeout``).
        """
        if description is SAME_AS_HELP:
            description = help if self._describe else None
        p = self._sub.add_parser(name, help=help, description=description)
        if config_help is not None:
            add_config_argument(p, config_help)
        if endpoint:
            p.add_argument(
                "--endpoint",
                help="control endpoint, e.g. tcp://127.0.0.1:7470 (overrides --config)",
            )
            p.add_argument(
                "--timeout", type=float, default=5.0, help="seconds to wait for the daemon"
            )
        p.set_defaults(func=handler)
        return p

    def group(self, name: str, help: str) -> CommandTable:
        """Add a command family (``lmcached NAME SUB ...``); return the table of its subcommands."""
        p = self._sub.add_parser(name, help=help)
        return CommandTable(p.add_subparsers(dest=f"{name}_command", required=True), describe=False)


def add_config_argument(
    p: argparse.ArgumentParser, help: str = DEFAULT_CONFIG_HELP, metavar: str | None = None
) -> None:
    """Add ``-c/--config``, defaulting to ``$LMCACHED_CONFIG`` (read when the parser is built)."""
    p.add_argument(
        "-c", "--config", default=os.environ.get(CONFIG_ENV) or None, help=help, metavar=metavar
    )


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """Return the config named by ``--config``/``$LMCACHED_CONFIG`` (or the defaults plus env)."""
    return config_mod.load(getattr(args, "config", None))


def client_for(args: argparse.Namespace, timeout: float = 5.0) -> Any:
    """Return a Client of the daemon named by ``--endpoint``, ``--config`` or the defaults."""
    from lmcached.client import Client

    if getattr(args, "endpoint", None):
        return Client(args.endpoint, timeout=timeout)
    cfg = load_config(args)  # validates a given file first: a config error exits 2
    config = getattr(args, "config", None)
    if config is None:
        from lmcached import runtime

        ep = runtime.control_endpoint(cfg) or f"tcp://{cfg.host}:{cfg.port}"
        return Client(ep, timeout=timeout)
    return Client.from_config(config, timeout=timeout)


def print_json(data: Any, file: TextIO | None = None) -> None:
    """Write ``data`` as indented JSON (the ``--json`` output of every command)."""
    print(json.dumps(data, indent=2, default=str), file=file or sys.stdout)
