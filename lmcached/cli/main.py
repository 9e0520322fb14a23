"""The `lmcached` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from lmcached import config as config_mod
from lmcached.cli import plugins as plugins_cli
from lmcached.cli.keygen import register as register_ops_commands
from lmcached.errors import ConfigError, LMCachedError, LMCachedUnavailable
from lmcached.version import PROTOCOL_VERSION, __version__

DEFAULT_CONFIG_HELP = "config file (default: built-in defaults plus LMCACHED_* env overrides)"


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(getattr(args, "config", None))


def _client(args: argparse.Namespace, timeout: float = 5.0) -> Any:
    from lmcached.client import Client

    if getattr(args, "endpoint", None):
        return Client(args.endpoint, timeout=timeout)
    cfg = _load(args)
    if args.config is None:
        from lmcached import runtime

        ep = runtime.control_endpoint(cfg) or f"tcp://{cfg.host}:{cfg.port}"
        return Client(ep, timeout=timeout)
    return Client.from_config(args.config, timeout=timeout)


def cmd_start(args: argparse.Namespace) -> int:
    from lmcached.daemon.service import run

    return run(_load(args))


def cmd_stop(args: argparse.Namespace) -> int:
    with _client(args, timeout=args.timeout) as client:
        client.control("shutdown")
    print("lmcached: shutdown requested")
    return 0


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def render_status(status: dict[str, Any]) -> str:
    """Render the status document as a table for people."""
    lines = [
        f"lmcached {status.get('version')}  pid {status.get('pid')}  epoch {status.get('epoch')}  "
        f"uptime {status.get('uptime_s', 0):.0f}s  control {status.get('control', {}).get('tcp')}",
        "",
        f"{'worker':>6} {'pid':>8} {'state':<10} {'blocks':>8} {'bytes':>10} {'hit rate':>8} "
        f"{'evict':>7} {'uss':>9} {'restarts':>8}",
    ]
    for w in status.get("workers", []):
        store = (w.get("stats") or {}).get("store", {})
        blocks = sum(t.get("entries", 0) for t in store.values() if isinstance(t, dict))
        used = sum(t.get("used_bytes", 0) for t in store.values() if isinstance(t, dict))
        cpu = store.get("cpu", {})
        hits, misses = cpu.get("hits", 0), cpu.get("misses", 0)
        rate = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
        state = w.get("state", "?") if w.get("responsive") or w.get("state") != "up" else "wedged"
        mem = w.get("memory") or {}
        lines.append(
            f"{w.get('id'):>6} {w.get('pid') or '-':>8} {state:<10} {blocks:>8} {_fmt_bytes(used):>10} "
            f"{rate:>8} {cpu.get('evictions', 0):>7} {_fmt_bytes(mem.get('uss')):>9} {w.get('restarts', 0):>8}"
        )
    from lmcached.cli.tier_table import render_tier_table

    lines.extend(render_tier_table(status))
    lines.extend(plugins_cli.status_lines(status))
    from lmcached.cli.reload import render_plugins

    lines += render_plugins(status)
    problems = status.get("problems")
    if problems is not None:
        lines.append("")
        lines.append("health: ok" if not problems else "health: UNHEALTHY: " + "; ".join(problems))
    if status.get("metrics"):
        lines.append(f"metrics: {status['metrics']}/metrics  health: {status['metrics']}/healthz")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        with _client(args, timeout=args.timeout) as client:
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
        print(json.dumps(status, indent=2, default=str))
    else:
        print(render_status(status))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load(args)
    import yaml

    print(f"# effective config (source: {cfg.source or 'built-in defaults'}; secrets redacted)")
    print(yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).rstrip())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    warning = config_mod.memory_warning(cfg)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"config ok: {cfg.source or 'built-in defaults'}")
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    print(config_mod.example_yaml())
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    prefix = args.prefix.encode()
    with _client(args, timeout=args.timeout) as client:
        count = client.purge(prefix)
    print(f"purged {count} keys with prefix {args.prefix!r}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from lmcached.bench import throughput as bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmcached", description="KV-cache daemon for LLM serving")
    parser.add_argument(
        "--version",
        action="version",
        version=f"lmcached {__version__} (protocol {PROTOCOL_VERSION})",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str, endpoint: bool = False
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", help=DEFAULT_CONFIG_HELP)
        if endpoint:
            p.add_argument(
                "--endpoint",
                help="control endpoint, e.g. tcp://127.0.0.1:7470 (overrides --config)",
            )
            p.add_argument(
                "--timeout", type=float, default=5.0, help="seconds to wait for the daemon"
            )
        p.set_defaults(func=func)
        return p

    add("start", cmd_start, "run the daemon in the foreground (scheduler + workers)")
    add("stop", cmd_stop, "ask a running daemon to shut down", endpoint=True)
    p = add("status", cmd_status, "show workers, blocks, bytes and hit rates", endpoint=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("purge", cmd_purge, "remove every key starting with a prefix", endpoint=True)
    p.add_argument("--prefix", required=True)

    cfg_parser = sub.add_parser("config", help="show or check a config file")
    cfg_sub = cfg_parser.add_subparsers(dest="config_command", required=True)
    for name, func, help in (
        (
            "show",
            cmd_config_show,
            "print the effective config (env overrides applied, secrets redacted)",
        ),
        ("check", cmd_config_check, "validate a config file and exit"),
        ("example", cmd_config_example, "print every key with its default and documentation"),
    ):
        p = cfg_sub.add_parser(name, help=help)
        p.add_argument("--config", help=DEFAULT_CONFIG_HELP)
        p.set_defaults(func=func)

    from lmcached.bench import throughput as bench

    bench.add_arguments(
        add(
            "bench",
            cmd_bench,
            "measure store/retrieve GB/s next to memcpy and raw ZMQ",
            endpoint=True,
        )
    )
    from lmcached.cli.reload import add_reload_command

    add_reload_command(add)
    from lmcached.cli import check

    check.register(sub)
    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Subcommands contributed by other modules: each is called with the subparsers object.
EXTRA_COMMANDS: list[Callable[[Any], None]] = [plugins_cli.add_parser, register_ops_commands]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"lmcached: config error: {exc}", file=sys.stderr)
        return 2
    except LMCachedUnavailable as exc:
        print(f"lmcached: daemon unavailable: {exc}", file=sys.stderr)
        return 3
    except LMCachedError as exc:
        print(f"lmcached: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
