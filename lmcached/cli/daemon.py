"""`lmcached start|stop|status|purge`: run the daemon, and ask a running one about itself."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from lmcached.cli.commands import CommandTable, client_for, load_config, print_json
from lmcached.errors import LMCachedUnavailable

# `status` exit codes, LSB-style: 0 running and healthy, 3 not running; 1 running but unhealthy.
EXIT_UNHEALTHY = 1
EXIT_NOT_RUNNING = 3
# How long `stop` waits for the daemon to exit by default: workers get shutdown_timeout plus,
# with disk or remote tiers, shutdown_flush_timeout to drain their writes, and plugins their
# stop timeout; this leaves room for all of them with the defaults.
DEFAULT_STOP_WAIT_S = 120.0
_POLL_S = 0.05


def register(commands: CommandTable) -> None:
    """Add `start`, `stop`, `status` and `purge`."""
    commands.add(
        "start",
        cmd_start,
        "run the daemon in the foreground (scheduler + workers)",
        description="Run the daemon in the foreground (scheduler + workers). Exit 1 with one "
        "line when a daemon already runs with this config's runtime folder.",
    )
    p = commands.add(
        "stop",
        cmd_stop,
        "ask a running daemon to shut down, and wait until it has exited",
        endpoint=True,
    )
    p.add_argument("--no-wait", action="store_true", help="return once the shutdown is requested")
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=DEFAULT_STOP_WAIT_S,
        help=f"seconds to wait for the exit (default {DEFAULT_STOP_WAIT_S:.0f}); exit 1 after",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = commands.add(
        "status",
        cmd_status,
        "show workers, blocks, bytes and hit rates",
        description="Show workers, blocks, bytes and hit rates. Exit 0 when healthy, "
        f"{EXIT_UNHEALTHY} when running but unhealthy, {EXIT_NOT_RUNNING} when no daemon answers.",
        endpoint=True,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = commands.add("purge", cmd_purge, "remove every key starting with a prefix", endpoint=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_start(args: argparse.Namespace) -> int:
    from lmcached.daemon.service import run
    from lmcached.runtime import InstanceLock

    cfg = load_config(args)
    # A daemon already running for this instance is the common mistake: say so in one line
    # before anything binds or logs. The scheduler takes the lock for real when it starts.
    probe = InstanceLock(cfg)
    probe.acquire()  # RuntimeDirError: main prints its message alone and exits 1
    probe.release()
    return run(cfg)


def cmd_stop(args: argparse.Namespace) -> int:
    from lmcached.runtime import host_id

    with client_for(args, timeout=args.timeout) as client:
        # The pid is only meaningful on this host; a daemon elsewhere is watched over the wire.
        local = client.cluster_map.get("host_id") == host_id()
        pid = int(client.ping()["pid"])
        client.control("shutdown")
        exited: bool | None = None
        if not args.no_wait:
            deadline = time.monotonic() + args.wait_timeout
            exited = _wait_pid_exit(pid, deadline) if local else _wait_silent(client, deadline)
    if args.json:
        print_json({"pid": pid, "shutdown_requested": True, "exited": exited})
    elif exited is None:
        print(f"lmcached: shutdown requested (pid {pid})")
    elif exited:
        print(f"lmcached: stopped (pid {pid})")
    if exited is False:
        print(
            f"lmcached stop: pid {pid} has not exited after {args.wait_timeout:g}s",
            file=sys.stderr,
        )
        return 1
    return 0


def _wait_pid_exit(pid: int, deadline: float) -> bool:
    """Wait until process ``pid`` has exited (a zombie counts: it has released everything)."""
    import psutil

    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _wait_silent(client: Any, deadline: float) -> bool:
    """Wait until the scheduler no longer answers a ping (a daemon on another host)."""
    while time.monotonic() < deadline:
        try:
            client.ping(timeout=1.0)
        except LMCachedUnavailable:
            return True
        time.sleep(_POLL_S * 4)
    return False


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with client_for(args, timeout=args.timeout) as client:
            status = client.stats()
    except LMCachedUnavailable as exc:
        if args.json:
            print(json.dumps({"running": False, "error": str(exc)}))
        else:
            print(f"lmcached is not running: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    status["running"] = True
    from lmcached.daemon.service import health_of_status

    status["problems"] = health_of_status(status)  # the rules /healthz applies
    if args.json:
        print_json(status)
    else:
        from lmcached.cli.status_view import render_status

        print(render_status(status))
    return EXIT_UNHEALTHY if status["problems"] else 0


def cmd_purge(args: argparse.Namespace) -> int:
    prefix = args.prefix.encode()
    with client_for(args, timeout=args.timeout) as client:
        count = client.purge(prefix)
    if args.json:
        print_json({"prefix": args.prefix, "purged": count})
    else:
        print(f"purged {count} keys with prefix {args.prefix!r}")
    return 0
