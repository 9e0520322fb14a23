"""`lmcached start|stop|status|purge`: run the daemon, and ask a running one about itself."""

from __future__ import annotations

import argparse
import json
import sys

from lmcached.cli.commands import CommandTable, client_for, load_config, print_json
from lmcached.errors import LMCachedUnavailable


def register(commands: CommandTable) -> None:
    """Add `start`, `stop`, `status` and `purge`."""
    commands.add("start", cmd_start, "run the daemon in the foreground (scheduler + workers)")
    commands.add("stop", cmd_stop, "ask a running daemon to shut down", endpoint=True)
    p = commands.add(
        "status", cmd_status, "show workers, blocks, bytes and hit rates", endpoint=True
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = commands.add("purge", cmd_purge, "remove every key starting with a prefix", endpoint=True)
    p.add_argument("--prefix", required=True)


def cmd_start(args: argparse.Namespace) -> int:
    from lmcached.daemon.service import run

    return run(load_config(args))


def cmd_stop(args: argparse.Namespace) -> int:
    with client_for(args, timeout=args.timeout) as client:
        client.control("shutdown")
    print("lmcached: shutdown requested")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with client_for(args, timeout=args.timeout) as client:
            status = client.stats()
    except LMCachedUnavailable as exc:
        if args.json:
            print(json.dumps({"running": False, "error": str(exc)}))
        else:
            print(f"lmcached is not running: {exc}", file=sys.stderr)
        return 3
    status["running"] = True
    from lmcached.daemon.service import health_of_status

    status["problems"] = health_of_status(status)  # the rules /healthz applies
    if args.json:
        print_json(status)
    else:
        from lmcached.cli.status_view import render_status

        print(render_status(status))
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    prefix = args.prefix.encode()
    with client_for(args, timeout=args.timeout) as client:
        count = client.purge(prefix)
    print(f"purged {count} keys with prefix {args.prefix!r}")
    return 0
