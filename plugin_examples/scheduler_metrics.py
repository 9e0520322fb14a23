"""Print a one-line summary of the daemon's stats every N seconds (runs on the scheduler only).

No shebang on purpose: a ``.py`` plugin without one runs with the daemon's own Python, so
``import lmcached`` works. Settings (``plugin_config: {scheduler_metrics.py: {settings: ...}}``):

- ``interval``: seconds between lines (default 30);
- ``timeout``: deadline of each stats call in seconds (default 5).

Example line::

    epoch=3 workers=2/2 entries=1200 used=300.0MiB hits=5400 misses=120 hit_rate=97.8%
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from lmcached.client import Client
from lmcached.errors import LMCachedError

stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())


def settings() -> dict:
    config = json.loads(os.environ.get("LMCACHE_PLUGIN_CONFIG") or "{}")
    raw = (config.get("plugin") or {}).get("settings") or {}
    return raw if isinstance(raw, dict) else {}


def summary(status: dict) -> str:
    workers = status.get("workers", [])
    up = sum(1 for w in workers if w.get("state") == "up")
    totals = status.get("totals", {})
    entries = sum(t.get("entries", 0) for t in totals.values())
    used = sum(t.get("used_bytes", 0) for t in totals.values())
    hits = sum(t.get("hits", 0) for t in totals.values())
    misses = sum(t.get("misses", 0) for t in totals.values())
    rate = f"{100.0 * hits / (hits + misses):.1f}%" if hits + misses else "n/a"
    return (
        f"epoch={status.get('epoch')} workers={up}/{len(workers)} entries={entries} "
        f"used={used / (1 << 20):.1f}MiB hits={hits} misses={misses} hit_rate={rate}"
    )


def main() -> int:
    endpoint = os.environ.get("LMCACHED_CONTROL_ENDPOINT")
    if not endpoint:
        print("LMCACHED_CONTROL_ENDPOINT is not set; run me as an lmcached plugin", file=sys.stderr)
        return 2
    opts = settings()
    interval = float(opts.get("interval", 30))
    timeout = float(opts.get("timeout", 5))
    if interval <= 0 or timeout <= 0:
        print(f"interval and timeout must be > 0, got {interval}, {timeout}", file=sys.stderr)
        return 2
    with Client(endpoint, timeout=timeout) as client:
        while not stop.is_set():
            try:
                print(summary(client.stats(timeout=timeout)), flush=True)
            except LMCachedError as exc:
                # The daemon may be starting or restarting a worker: say so and keep going.
                print(f"stats unavailable: {exc}", file=sys.stderr, flush=True)
            stop.wait(interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
