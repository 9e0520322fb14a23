"""Helpers of the shared-memory tests: worker processes and their stats."""

from __future__ import annotations

from typing import Any


def cpu_stats(client: Any) -> list[dict[str, Any]]:
    """Every worker's CPU-tier counters, in worker order."""
    return [w["stats"]["store"]["cpu"] for w in client.stats()["workers"]]


def worker_pid(client: Any, worker: int) -> int:
    pid = client.cluster_map["workers"][worker]["pid"]
    assert isinstance(pid, int)
    return pid
