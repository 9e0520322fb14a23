"""Render the `status` document as tables for people: workers, tiers, extensions, plugins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmcached.cli.tier_table import render_tier_table
from lmcached.supervision.states import WORKER_UP


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
        state = (
            w.get("state", "?") if w.get("responsive") or w.get("state") != WORKER_UP else "wedged"
        )
        mem = w.get("memory") or {}
        lines.append(
            f"{w.get('id'):>6} {w.get('pid') or '-':>8} {state:<10} {blocks:>8} {_fmt_bytes(used):>10} "
            f"{rate:>8} {cpu.get('evictions', 0):>7} {_fmt_bytes(mem.get('uss')):>9} {w.get('restarts', 0):>8}"
        )
    lines.extend(render_tier_table(status))
    lines.extend(extension_lines(status))
    lines.extend(render_plugins(status))
    problems = status.get("problems")
    if problems is not None:
        lines.append("")
        lines.append("health: ok" if not problems else "health: UNHEALTHY: " + "; ".join(problems))
    if status.get("metrics"):
        lines.append(f"metrics: {status['metrics']}/metrics  health: {status['metrics']}/healthz")
    return "\n".join(lines)


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


def extension_lines(status: dict[str, Any]) -> list[str]:
    """Return the plugin section of ``lmcached status``: each plugin's state per worker.

    General plugins (per process) and the scheduler's stat loggers are rows too; the scheduler
    is the process ``sched``.
    """
    rows = general_plugin_rows("sched", status.get("general_plugins"))
    for name, state in sorted((status.get("stat_loggers") or {}).items()):
        counts = f"records={state.get('records', 0)}, dropped={state.get('dropped', 0)}"
        detail = state.get("last_error") or state.get("error") or counts
        rows.append(
            [
                "sched",
                name,
                "stat_logger",
                state.get("state", "?"),
                str(state.get("errors", 0)),
                detail,
            ]
        )
    for w in status.get("workers", []):
        rows += general_plugin_rows(str(w.get("id")), (w.get("stats") or {}).get("general_plugins"))
    for w in status.get("workers", []):
        stats = w.get("stats") or {}
        store = stats.get("store") or {}
        for name, state in sorted((stats.get("extensions") or {}).items()):
            tier = store.get(name) or {}
            metrics = state.get("metrics") or tier.get("plugin") or {}
            shown = ", ".join(f"{k}={v}" for k, v in metrics.items() if isinstance(v, (int, float)))
            rows.append(
                [
                    str(w.get("id")),
                    name,
                    state.get("category", "?"),
                    state.get("state", "?"),
                    str(tier.get("plugin_errors", 0)),
                    state.get("error") or shown or "-",
                ]
            )
    if not rows:
        return []
    return ["", *table_lines(["WORKER", "PLUGIN", "CATEGORY", "STATE", "ERRORS", "DETAIL"], rows)]


def general_plugin_rows(where: str, runs: Any) -> list[list[str]]:
    """Return one status row per general plugin run in one process."""
    rows = []
    for name, run in sorted((runs or {}).items()):
        failed = run.get("state") != "ok"
        rows.append(
            [
                where,
                name,
                "general",
                run.get("state", "?"),
                str(int(failed)),
                run.get("error") or "-",
            ]
        )
    return rows


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
