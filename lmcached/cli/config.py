"""`lmcached config show|check|example`: the effective config, a validation, every key."""

from __future__ import annotations

import argparse
import sys

from lmcached import config as config_mod
from lmcached.cli.commands import CommandTable, load_config, print_json


def register(commands: CommandTable) -> None:
    """Add the `config` family."""
    family = commands.group("config", "show or check a config file")
    p = family.add(
        "show",
        cmd_config_show,
        "print the effective config (env overrides applied, secrets redacted)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p = family.add("check", cmd_config_check, "validate a config file and exit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    family.add("example", cmd_config_example, "print every key with its default and documentation")


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    for note in cfg.warnings:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print_json(cfg.to_dict(redact=True))
        return 0
    import yaml

    print(f"# effective config (source: {cfg.source or 'built-in defaults'}; secrets redacted)")
    print(yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).rstrip())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    from lmcached.daemon.assembly import check_store_config
    from lmcached.errors import ConfigError, ConfigErrors

    problems: list[ConfigError] = []
    warnings: list[str] = []
    cfg = None
    try:
        cfg = load_config(args)
    except ConfigErrors as exc:
        problems = exc.problems
    except ConfigError as exc:
        problems = [exc]
    if cfg is not None:
        warnings = list(cfg.warnings)
        try:
            check_store_config(cfg)
        except ConfigError as exc:
            problems = [exc]
        else:
            warning = config_mod.memory_warning(cfg)
            warnings += [warning] if warning else []
    source = cfg.source if cfg is not None else args.config
    if args.json:
        print_json(
            {
                "ok": not problems,
                "source": source,
                "errors": [str(p) for p in problems],
                "warnings": warnings,
            }
        )
        return 2 if problems else 0
    for note in warnings:
        print(f"warning: {note}", file=sys.stderr)
    # Every problem of the file and the environment, one line each, in one run.
    for problem in problems:
        print(f"lmcached: config error: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"config ok: {source or 'built-in defaults'}")
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    print(config_mod.example_yaml())
    return 0
