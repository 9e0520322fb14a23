"""`lmcached reload`: rescan the script plugins of every process (the cache is not touched)."""

from __future__ import annotations

import argparse

from lmcached.cli.commands import CommandTable, client_for, print_json


def register(commands: CommandTable) -> None:
    """Add `reload`."""
    p = commands.add(
        "reload",
        cmd_reload,
        "rescan plugin locations in every process: start new plugins, stop removed ones, "
        "restart changed ones (the cache is not touched); same as SIGHUP",
        endpoint=True,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_reload(args: argparse.Namespace) -> int:
    with client_for(args, timeout=args.timeout) as client:
        reply = client.control("reload", timeout=args.timeout)
    result = (reply.get("reloaded") or {}).get("plugins", {})
    if args.json:
        print_json(result)
        return 0 if "error" not in result else 2
    if "error" in result:
        print(f"lmcached reload: {result['error']}")
        return 2
    changes = result.get("scheduler") or {}
    done = [f"{k} {', '.join(v)}" for k, v in changes.items() if isinstance(v, list) and v]
    print(f"scheduler plugins: {'; '.join(done) if done else 'no change'}")
    workers = result.get("workers_signalled", [])
    print(f"workers asked to rescan: {', '.join(map(str, workers)) if workers else 'none'}")
    if result.get("needs_restart"):
        print(f"changed keys that need a restart: {', '.join(result['needs_restart'])}")
    return 0
