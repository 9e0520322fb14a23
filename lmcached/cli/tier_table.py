"""Render per-tier counters (CPU, disk, remote) as a table for `lmcached status`."""

from __future__ import annotations

from typing import Any


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def render_tier_table(status: dict[str, Any]) -> list[str]:
    """Return the lines of a table with one row per worker and tier."""
    header = (
        f"{'worker':>6} {'tier':<7} {'hits':>9} {'misses':>9} {'used':>10} {'evict':>7} "
        f"{'q-drops':>7} {'csum-err':>8} {'get p99':>9} {'health':<8}"
    )
    lines = ["", header]
    for w in status.get("workers", []):
        store = (w.get("stats") or {}).get("store") or {}
        for name, t in store.items():
            if not isinstance(t, dict):
                continue
            lat = t.get("get_latency") or {}
            p99 = f"{lat.get('p99_ms', 0):.2f}ms" if lat.get("count") else "-"
            health = t.get("health", "-")
            lines.append(
                f"{w.get('id'):>6} {name:<7} {t.get('hits', 0):>9} {t.get('misses', 0):>9} "
                f"{_size(t.get('used_bytes')) if name != 'remote' else '-':>10} "
                f"{t.get('evictions', 0):>7} {t.get('queue_drops', 0):>7} "
                f"{t.get('checksum_failures', 0):>8} {p99:>9} {health:<8}"
            )
    return lines
