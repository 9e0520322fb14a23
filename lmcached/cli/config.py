"""`lmcached config show|check|example`: the effective config, a validation, every key."""

from __future__ import annotations

import argparse
import sys

from lmcached import config as config_mod
from lmcached.cli.commands import CommandTable, load_config


def register(commands: CommandTable) -> None:
    """Add the `config` family."""
    family = commands.group("config", "show or check a config file")
    family.add(
        "show",
        cmd_config_show,
        "print the effective config (env overrides applied, secrets redacted)",
    )
    family.add("check", cmd_config_check, "validate a config file and exit")
    family.add("example", cmd_config_example, "print every key with its default and documentation")


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    import yaml

    print(f"# effective config (source: {cfg.source or 'built-in defaults'}; secrets redacted)")
    print(yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).rstrip())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from lmcached.daemon.assembly import check_store_config

    cfg = load_config(args)
    check_store_config(cfg)
    warning = config_mod.memory_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"config ok: {cfg.source or 'built-in defaults'}")
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    print(config_mod.example_yaml())
    return 0
