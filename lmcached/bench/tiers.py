"""The `tiers` section of `lmcached bench`: disk and remote tiers next to plain baselines.

Every figure is measured in the same run as its baseline, on the same blocks:

- remote (Redis): a real redis-server on a free loopback port.
  - baseline: plain redis-py with hiredis, one SET / GET per block;
  - ``remote cold retrieve``: a daemon with an empty CPU tier reads each block from Redis
    (one client get per block, through the daemon: an extra hop), target >= 0.6x redis-py GET;
  - ``remote promoted retrieve``: the same blocks again, now promoted into CPU, target >= 2x.
- disk:
  - baseline: a plain ``open().read()`` of the very block files the disk tier wrote;
  - ``disk retrieve``: a daemon with an empty CPU tier reads each block from disk, target
    >= 0.7x the plain read. Measured with a warm page cache, and cold (``os.sync`` then
    ``posix_fadvise(DONTNEED)`` on every file before each side).
  - page-cache residency of the block files after writing them, with ``disk_drop_cache`` off
    and on (mincore), to show what the option does.

``run_tiers`` returns rows of plain dicts, so `lmcached bench` can print them or dump JSON.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

MiB = 1 << 20
Row = dict[str, Any]


def _progress(msg: str) -> None:
    print(f"  .. tiers: {msg}", file=sys.stderr, flush=True)


def _blocks(size: int, n: int, tag: str) -> list[tuple[bytes, bytes]]:
    # Distinct random payloads: nothing compresses or dedups behind our back.
    return [(f"bench/{tag}/{size}/{i:06d}".encode(), os.urandom(size)) for i in range(n)]


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def _best(fn: Callable[[], float], repeats: int) -> float:
    return max(fn() for _ in range(repeats))


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _timed_gbps(nbytes: int, fn: Callable[[], Any]) -> float:
    return _gbps(nbytes, _timed(fn))


# The timed bodies are module functions bound with partial (not lambdas binding the loop's
# variables through defaults, whose types mypy cannot infer).
def _redis_set_all(raw: Any, blocks: list[tuple[bytes, bytes]]) -> list[Any]:
    return [raw.set(k, v) for k, v in blocks]


def _redis_get_all(raw: Any, blocks: list[tuple[bytes, bytes]]) -> list[Any]:
    return [raw.get(k) for k, _ in blocks]


def _put_all(client: Any, blocks: list[tuple[bytes, bytes]]) -> list[Any]:
    return [client.put([k], [v]) for k, v in blocks]


def _read_files(paths: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in paths]


def _row(case: str, size: int, gbps: float, baseline: str, base: float, target: float) -> Row:
    ratio = gbps / base if base else None
    return {
        "section": "tiers",
        "case": case,
        "size": size,
        "gbps": round(gbps, 3),
        "baseline": baseline,
        "baseline_gbps": round(base, 3),
        "ratio": None if ratio is None else round(ratio, 3),
        "target": target,
        "meets_target": None if ratio is None or not target else ratio >= target,
    }


# ------------------------------------------------------------------------ page cache helpers
def drop_page_cache(paths: list[Path]) -> None:
    """Write dirty pages back, then ask the kernel to drop the files' cached pages."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float:
    """Return the fraction of the files' pages that sit in the page cache (mmap + mincore)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = p.stat().st_size
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {p} failed")
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {p} failed")
                resident += sum(v & 1 for v in vec)
                total += pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


# ------------------------------------------------------------------------------- remote tier
def bench_remote(sizes: list[int], total: int, repeats: int, workdir: Path) -> list[Row]:
    """Remote tier through the daemon vs plain redis-py, on the same block sizes."""
    import redis

    from lmcached.testing import DaemonProcess, RedisServer

    rows: list[Row] = []
    with RedisServer(workdir / "redis") as server:
        raw = redis.Redis(port=server.port, socket_timeout=60)
        for size in sizes:
            n = max(2, total // size)
            nbytes = n * size
            _progress(f"redis-py SET/GET {size // 1024} KiB x{n}")
            baseline = _blocks(size, n, "raw")
            set_gbps = _best(
                partial(_timed_gbps, nbytes, partial(_redis_set_all, raw, baseline)), repeats
            )
            get_gbps = _best(
                partial(_timed_gbps, nbytes, partial(_redis_get_all, raw, baseline)), repeats
            )
            raw.delete(*(k for k, _ in baseline))
            del baseline

            sets = [_blocks(size, n, f"remote{r}") for r in range(repeats)]
            daemon = DaemonProcess(
                workdir / f"remote-{size}",
                num_workers=1,
                max_local_cpu_size=f"{max(512, 2 * repeats * nbytes // MiB)}MiB",
                remote_url=server.url,
                remote_timeout=10.0,
                write_queue_size=f"{max(512, repeats * nbytes // MiB + 64)}MiB",
                log_level="warning",
            )
            with daemon:
                _progress(f"lmcached put -> remote {size // 1024} KiB x{n}")
                with daemon.client(timeout=120) as c:
                    put_s = []
                    for blocks in sets:
                        put_s.append(_timed(partial(_put_all, c, blocks)))
                    c.flush(timeout=300)
                    stored = c.stats()["totals"]["remote"]["puts"]
                if stored != repeats * n:
                    raise RuntimeError(f"only {stored} of {repeats * n} blocks reached Redis")
                daemon.stop()  # an empty CPU tier: the next reads must come from Redis
                daemon.start()
                cold: list[float] = []
                warm: list[float] = []
                with daemon.client(timeout=120) as c:
                    _warm_up(c)
                    for blocks in sets:
                        cold.append(_gbps(nbytes, _timed(partial(_read_all, c, blocks))))
                        warm.append(_gbps(nbytes, _timed(partial(_read_all, c, blocks))))
                    remote_hits = c.stats()["totals"]["remote"]["hits"]
                if remote_hits != repeats * n:
                    raise RuntimeError(f"expected {repeats * n} remote hits, got {remote_hits}")
            rows.append(
                _row("remote store (ack from CPU)", size, max(_gbps(nbytes, s) for s in put_s),
                     "redis-py SET", set_gbps, 0.0)
            )  # fmt: skip
            rows.append(
                _row("remote cold retrieve", size, max(cold), "redis-py GET", get_gbps, 0.6)
            )
            rows.append(
                _row("remote promoted retrieve", size, max(warm), "redis-py GET", get_gbps, 2.0)
            )
            raw.flushall()
        raw.close()
    return rows


def _warm_up(client: Any) -> None:
    # The first calls after a start connect to the workers and start their I/O threads: not
    # what is being measured. A get of absent keys goes the whole off-loop path.
    for i in range(8):
        client.get([f"bench/warm-up/{i}".encode()])


def _read_all(client: Any, blocks: list[tuple[bytes, bytes]]) -> None:
    """Get each block with its own call, dropping each result at once.

    Both sides of every comparison drop what they read, so both reuse memory: the figure is
    the read path, not the page faults of fresh buffers. Every result is checked for presence
    and size, and the last one's bytes are compared (the daemon verified all of them by
    checksum before replying).
    """
    last = None
    for key, value in blocks:
        got = client.get([key])[0]
        if got is None or memoryview(got).nbytes != len(value):
            raise RuntimeError(f"block {key!r} was not served whole")
        last = got
    if last is not None and bytes(last) != blocks[-1][1]:
        raise RuntimeError("a block came back with different bytes")


# --------------------------------------------------------------------------------- disk tier
def bench_disk(sizes: list[int], total: int, repeats: int, workdir: Path) -> list[Row]:
    """Disk tier through the daemon vs a plain read of the same files, warm and cold."""
    from lmcached.storage.blockfile import file_name
    from lmcached.testing import DaemonProcess

    rows: list[Row] = []
    for size in sizes:
        n = max(2, total // size)
        nbytes = n * size
        sets = [_blocks(size, n, f"disk{r}") for r in range(repeats)]
        results: dict[str, list[float]] = {}
        for drop in (False, True):
            disk = workdir / f"disk-{size}-{int(drop)}"
            daemon = DaemonProcess(
                workdir / f"diskd-{size}-{int(drop)}",
                num_workers=1,
                max_local_cpu_size=f"{max(512, 2 * repeats * nbytes // MiB)}MiB",
                local_disk=str(disk),
                max_local_disk_size=f"{2 * repeats * nbytes // MiB + 64}MiB",
                disk_drop_cache=drop,
                write_queue_size=f"{max(512, repeats * nbytes // MiB + 64)}MiB",
                log_level="warning",
            )
            files = [[disk / "0" / file_name(k) for k, _ in blocks] for blocks in sets]
            with daemon:
                _progress(f"lmcached put -> disk {size // 1024} KiB x{n} drop_cache={drop}")
                with daemon.client(timeout=120) as c:
                    start = time.perf_counter()
                    for blocks in sets:
                        for k, v in blocks:
                            c.put([k], [v])
                    c.flush(timeout=300)
                    write_s = time.perf_counter() - start
                results[f"write/{drop}"] = [_gbps(repeats * nbytes, write_s)]
                results[f"resident/{drop}"] = [resident_fraction([f for fs in files for f in fs])]
                if drop:
                    continue  # the read comparison is made once, with the default settings
                for mode in ("warm", "cold"):
                    daemon.stop()  # an empty CPU tier: the reads must come from disk
                    daemon.start()
                    with daemon.client(timeout=120) as c:
                        _warm_up(c)
                        for blocks, paths in zip(sets, files, strict=True):
                            if mode == "cold":
                                drop_page_cache(paths)
                            plain = _timed(partial(_read_files, paths))
                            if mode == "cold":
                                drop_page_cache(paths)
                            ours = _timed(partial(_read_all, c, blocks))
                            results.setdefault(f"plain/{mode}", []).append(_gbps(nbytes, plain))
                            results.setdefault(f"ours/{mode}", []).append(_gbps(nbytes, ours))
                        disk_hits = c.stats()["totals"]["disk"]["hits"]
                    if disk_hits != repeats * n:
                        raise RuntimeError(f"expected {repeats * n} disk hits, got {disk_hits}")
        for mode in ("warm", "cold"):
            rows.append(
                _row(f"disk retrieve, page cache {mode}", size, max(results[f"ours/{mode}"]),
                     "plain file read", max(results[f"plain/{mode}"]), 0.7)
            )  # fmt: skip
        for drop in (False, True):
            row = _row(
                f"disk store+flush, disk_drop_cache={'on' if drop else 'off'}",
                size,
                results[f"write/{drop}"][0],
                "disk_drop_cache=off",
                results["write/False"][0],
                0.0,
            )
            row["page_cache_resident"] = round(results[f"resident/{drop}"][0], 3)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- section
def run_tiers(
    sizes: list[int] | None = None,
    bytes_per_point: int = 128 * MiB,
    repeats: int = 3,
    quick: bool = False,
    workdir: str | None = None,
    parts: tuple[str, ...] = ("remote", "disk"),
) -> list[Row]:
    """Run the tiers section and return its rows (dicts; see the module docstring)."""
    sizes = sizes or [2 * MiB, 32 * MiB]
    if quick:
        sizes, bytes_per_point, repeats = [256 * 1024, 2 * MiB], 8 * MiB, 1
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="lmbench-tiers-", dir=workdir) as tmp:
        if "remote" in parts:
            rows += bench_remote(sizes, bytes_per_point, repeats, Path(tmp))
        if "disk" in parts:
            rows += bench_disk(sizes, bytes_per_point, repeats, Path(tmp))
    return rows


def render_tiers(rows: list[Row]) -> str:
    """Render the rows as a table (GB/s next to the baseline of the same run)."""
    lines = [
        "",
        "tiers (baselines measured in the same run):",
        f"{'case':<40}{'block':>9}{'GB/s':>8}  {'baseline':<22}{'GB/s':>7}{'ratio':>7}"
        f"{'target':>8}",
    ]
    for r in rows:
        target = f">={r['target']}" if r.get("target") else ""
        verdict = {True: " ok", False: " MISS", None: ""}[r.get("meets_target")]
        extra = (
            f"  (resident in page cache: {r['page_cache_resident']:.0%})"
            if "page_cache_resident" in r
            else ""
        )
        lines.append(
            f"{r['case']:<40}{r['size'] // 1024:>6}KiB{r['gbps']:>8.2f}  {r['baseline']:<22}"
            f"{r['baseline_gbps']:>7.2f}{r['ratio'] or 0:>7.2f}{target:>8}{verdict}{extra}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from lmcached.config import byte_size

    p = argparse.ArgumentParser(prog="python -m lmcached.bench.tiers", description=__doc__)
    p.add_argument("--sizes", default="2MiB,32MiB")
    p.add_argument("--bytes-per-point", default="128MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--parts", default="remote,disk", help="remote, disk or both")
    args = p.parse_args(argv)
    rows = run_tiers(
        [byte_size(s) for s in args.sizes.split(",")],
        byte_size(args.bytes_per_point),
        args.repeats,
        args.quick,
        parts=tuple(args.parts.split(",")),
    )
    print(render_tiers(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
