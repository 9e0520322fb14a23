"""The plugin parts of the command line: `lmcached reload`, and plugin rows in `lmcached status`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def add_reload_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register `lmcached reload` through cli.build_parser's ``add`` helper."""
    p = add(
        "reload",
        cmd_reload,
        "rescan plugin locations in every process: start new plugins, stop removed ones, "
        "restart changed ones (the cache is not touched); same as SIGHUP",
        endpoint=True,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_reload(args: argparse.Namespace) -> int:
    from lmcached.cli.main import _client

    with _client(args, timeout=args.timeout) as client:
        reply = client.control("reload", timeout=args.timeout)
    result = (reply.get("reloaded") or {}).get("plugins", {})
    if args.json:
        print(json.dumps(result, indent=2, default=str))
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


def render_plugins(status: dict[str, Any]) -> list[str]:
    """Return table lines for every plugin of the scheduler and the workers (none: no lines)."""
    rows = [("scheduler", p) for p in status.get("plugins", [])]
    for w in status.get("workers", []):
        rows += [(f"worker {w.get('id')}", p) for p in (w.get("stats") or {}).get("plugins", [])]
    if not rows:
        return []
    lines = [
        "",
        f"{'plugin':<28} {'process':<10} {'state':<9} {'pid':>8} {'restarts':>8} {'exit':>5}  error",
    ]
    for where, p in rows:
        code = p.get("exit_code")
        lines.append(
            f"{p.get('name', '?'):<28} {where:<10} {p.get('state', '?'):<9} "
            f"{p.get('pid') or '-':>8} {p.get('restarts', 0):>8} "
            f"{'-' if code is None else code:>5}  {p.get('last_error') or ''}".rstrip()
        )
    return lines
