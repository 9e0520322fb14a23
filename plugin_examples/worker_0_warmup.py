"""Preload blocks listed in a manifest file into the cache, once, at start (worker 0 only).

Running on worker 0 alone means the warm-up happens once per daemon, not once per worker; the
blocks still go to whichever worker owns each key. No shebang on purpose: it runs with the
daemon's own Python, so ``import lmcached`` works.

The manifest (setting ``manifest``) has one block per line: a key, whitespace, and the file that
holds the block's bytes (relative paths are relative to the manifest). Blank lines and lines
starting with ``#`` are skipped::

    # key                                   file
    default/llama@rev1/any/3f2a...        blocks/3f2a.bin

Settings (``plugin_config: {worker_0_warmup.py: {settings: {...}}}``):

- ``manifest``: path of the manifest (required);
- ``batch``: blocks per put (default 32);
- ``wait``: seconds to wait for the daemon to accept requests (default 60).

Exits 0 when every block was loaded, 1 when some could not be read or stored (each one is named
on stderr), 2 on a usage error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lmcached.client import Client
from lmcached.errors import LMCachedError, LMCachedUnavailable


def settings() -> dict:
    config = json.loads(os.environ.get("LMCACHE_PLUGIN_CONFIG") or "{}")
    raw = (config.get("plugin") or {}).get("settings") or {}
    return raw if isinstance(raw, dict) else {}


def read_manifest(path: Path) -> list[tuple[bytes, Path]]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected '<key> <file>', got {line!r}")
        key, file = parts
        entries.append((key.encode(), (path.parent / file).resolve()))
    return entries


def wait_until_ready(client: Client, wait: float) -> None:
    """Wait until every worker is up: worker plugins start before the whole daemon is ready."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if client.ping(timeout=2).get("ready"):
                return
        except LMCachedUnavailable:
            pass
        if time.monotonic() >= deadline:
            raise LMCachedUnavailable(f"the daemon was not ready within {wait}s")
        time.sleep(0.2)


def main() -> int:
    opts = settings()
    endpoint = os.environ.get("LMCACHED_CONTROL_ENDPOINT")
    manifest = opts.get("manifest")
    if not endpoint or not manifest:
        print("need LMCACHED_CONTROL_ENDPOINT and the setting 'manifest'", file=sys.stderr)
        return 2
    batch = int(opts.get("batch", 32))
    try:
        entries = read_manifest(Path(manifest))
    except (OSError, ValueError) as exc:
        print(f"cannot read manifest: {exc}", file=sys.stderr)
        return 2
    loaded = failed = 0
    nbytes = 0
    started = time.monotonic()
    with Client(endpoint) as client:
        try:
            wait_until_ready(client, float(opts.get("wait", 60)))
        except LMCachedError as exc:
            print(f"daemon not ready: {exc}", file=sys.stderr)
            return 1
        for i in range(0, len(entries), batch):
            keys, values = [], []
            for key, file in entries[i : i + batch]:
                try:
                    values.append(file.read_bytes())
                    keys.append(key)
                except OSError as exc:
                    failed += 1
                    print(f"skip {key.decode(errors='replace')}: {exc}", file=sys.stderr)
            if not keys:
                continue
            try:
                client.put(keys, values)
                loaded += len(keys)
                nbytes += sum(len(v) for v in values)
            except LMCachedError as exc:
                failed += len(keys)
                print(f"put of {len(keys)} blocks failed: {exc}", file=sys.stderr)
    elapsed = time.monotonic() - started
    mib = nbytes / (1 << 20)
    print(f"warm-up: {loaded} blocks ({mib:.1f} MiB) in {elapsed:.2f}s, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
