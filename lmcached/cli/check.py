"""`lmcached check`: reconcile the disk tier's files with their headers, and optionally repair.

Reports torn temporary files, files whose header, metadata or payload fails verification, files
whose name does not match the key in their header, files a worker moved to its ``quarantine/``
folder at start, and files in a shard that does not own their key (after a num_workers change
that no worker has applied yet). ``--fix`` deletes the broken and quarantined files and moves
misplaced ones to their owner; it reports what it could not repair instead of raising. A running daemon is left alone unless ``--force``: its
workers are writing temporary files that a fix would delete.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import Any

from lmcached import config as config_mod
from lmcached.cli.commands import CommandTable, load_config, print_json
from lmcached.cli.progress import TerminalStatus
from lmcached.routing import owner
from lmcached.runtime import pid_alive, read_endpoints

# A usage error, like a config error: the command was pointed at something that is not there.
EXIT_NO_FOLDER = 2


def _daemon_running(cfg: config_mod.Config) -> bool:
    data = read_endpoints(cfg)
    pid = data.get("pid") if data else None
    return isinstance(pid, int) and pid_alive(pid)


def cmd_check(args: argparse.Namespace) -> int:
    """Check (and with --fix repair) the disk tier; exit 0 when clean, 1 when problems remain."""
    from lmcached.storage.disk import check_disk

    cfg = load_config(args)
    if not cfg.local_disk:
        print("no disk tier configured (local_disk is unset): nothing to check")
        return 0
    if not os.path.isdir(cfg.local_disk):
        # Checking nothing would report "0 problems" for a mistyped path or an unmounted volume.
        print(
            f"lmcached check: local_disk {cfg.local_disk} does not exist or is not a folder",
            file=sys.stderr,
        )
        return EXIT_NO_FOLDER
    if args.fix and not args.force and _daemon_running(cfg):
        print(
            "lmcached: the daemon for this config is running; stop it first, or pass --force",
            file=sys.stderr,
        )
        return 1
    with TerminalStatus() as status:
        report = check_disk(
            cfg.local_disk,
            owner=partial(owner, num_workers=cfg.num_workers),
            fix=args.fix,
            verify_payload=not args.headers_only,
            progress=lambda r: status.update(
                f"checking {cfg.local_disk}: {r.files} block files, {r.bytes} bytes, "
                f"{len(r.problems)} problems so far"
            ),
        )
    out: dict[str, Any] = {"local_disk": cfg.local_disk, **report.as_dict()}
    if args.json:
        print_json(out)
    else:
        print(
            f"{cfg.local_disk}: {report.files} block files, {report.bytes} bytes, "
            f"{report.ok} ok, {len(report.problems)} problems"
            + (f", {report.fixed} fixed" if args.fix else "")
        )
        for path, problem in report.problems:
            print(f"  {path}: {problem}")
        if report.problems and not args.fix:
            print("run with --fix to delete broken files and move misplaced ones")
    unfixed = len(report.problems) - report.fixed
    return 0 if unfixed == 0 else 1


def register(commands: CommandTable) -> None:
    """Add `check`."""
    p = commands.add(
        "check",
        cmd_check,
        "verify the disk tier's files against their headers (and repair with --fix)",
        description=__doc__,
        config_help="config file (default: built-in defaults + env)",
    )
    p.add_argument("--fix", action="store_true", help="delete broken files, move misplaced ones")
    p.add_argument("--force", action="store_true", help="allow --fix while the daemon runs")
    p.add_argument(
        "--headers-only", action="store_true", help="skip payload checksums (faster; headers only)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
