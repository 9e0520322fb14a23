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

    for note in cfg.warnings:
        print(f"warning: {note}", file=sys.stderr)
    print(f"# effective config (source: {cfg.source or 'built-in defaults'}; secrets redacted)")
    print(yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).rstrip())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from lmcached.daemon.assembly import check_store_config
    from lmcached.errors import ConfigError, ConfigErrors

    try:
        cfg = load_config(args)
    except ConfigErrors as exc:
        # Every problem of the file and the environment, one line each, in one run.
        for problem in exc.problems:
            print(f"lmcached: config error: {problem}", file=sys.stderr)
        return 2
    for note in cfg.warnings:
        print(f"warning: {note}", file=sys.stderr)
    try:
        check_store_config(cfg)
    except ConfigError as exc:
        print(f"lmcached: config error: {exc}", file=sys.stderr)
        return 2
    warning = config_mod.memory_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"config ok: {cfg.source or 'built-in defaults'}")
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    print(config_mod.example_yaml())
    return 0
