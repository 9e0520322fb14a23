"""Another client's CPU-hit latency while one client floods the daemon with hostile-but-legal puts.

Runs ``lmcached`` (DaemonProcess, CPU tier only), a fresh daemon per stream. A measuring client
puts one small block, then times single-key gets of it (a CPU-tier hit) for ``--seconds``:
first quiet, then while a second process streams puts of

- ``metas``: 0-byte blocks, each with a meta at the ``max_meta_bytes`` cap;
- ``keys``: 0-byte blocks under keys of ``max_key_length`` bytes, full batches;
- ``largest``: the largest legal puts (``max_block_size`` blocks, as many as
  ``max_request_bytes`` allows in one put).

Meanwhile every worker's RSS is sampled every 0.1 s (its maximum, split into anonymous and
shared-memory pages). Targets, per stream: hit p99 <= 2 x quiet p99 + 10 ms, no hit over
100 ms, every worker's RSS <= its CPU budget + 64 MiB. Prints a table; exit status 0 when all
hold.

    python scripts/hit_latency_under_load.py --seconds 20
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lmcached import LMCachedError, protocol
from lmcached.testing import DaemonProcess, wait_until

MiB = 1 << 20
HIT_KEY = b"hit/probe"
SLACK = 64 * MiB  # the target: RSS within the CPU budget plus this


def meta_at_cap(cap: int) -> dict[str, Any]:
    """The largest {"pad": "x" * n} whose encoded size is at most ``cap``."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if protocol.meta_size({"pad": "x" * mid}) <= cap:
            lo = mid
        else:
            hi = mid - 1
    return {"pad": "x" * lo}


def stream(config: str, kind: str, stop: Any, puts: Any, shared_memory: bool = True) -> None:
    """Put in a loop until ``stop`` is set (runs in its own process: its own GIL)."""
    from lmcached.client import Client

    with Client.from_config(config, timeout=30, shared_memory=shared_memory) as c:
        limits = c._cluster.ensure(time.monotonic() + 30).limits  # the published limits
        tag = uuid.uuid4().hex[:8]
        n = 0
        meta = meta_at_cap(limits.max_meta_bytes)
        big = os.urandom(limits.max_block_size)
        while not stop.is_set():
            if kind == "metas":
                keys = [f"m/{tag}/{n}/{i}".encode() for i in range(8)]
                c.put(keys, [b""] * len(keys), [meta] * len(keys))
            elif kind == "keys":
                batch = limits.max_keys_per_batch
                keys = []
                for i in range(batch):
                    head = f"k/{tag}/{n}/{i}/".encode()
                    keys.append(head + b"z" * (limits.max_key_length - len(head)))
                c.put(keys, [b""] * batch)
            else:
                per = max(1, limits.max_request_bytes // limits.max_block_size)
                keys = [f"L/{tag}/{n}/{i}".encode() for i in range(per)]
                c.put(keys, [big] * per)
            n += 1
            with puts.get_lock():
                puts.value += len(keys)


@dataclass
class Phase:
    name: str
    lat_ms: list[float] = field(default_factory=list)
    misses: int = 0
    errors: int = 0
    puts: int = 0
    rss: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # id -> max rss,anon,shm
    quiet: Phase | None = None  # the quiet phase a stream's latency is compared with
    put_ms: float = float("nan")  # mean worker time per put request (receipt to reply)

    def pct(self, q: float) -> float:
        s = sorted(self.lat_ms)
        return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def rss_parts(pid: int) -> tuple[int, int, int]:
    out = {"VmRSS": 0, "RssAnon": 0, "RssShmem": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in out:
                out[name] = int(rest.split()[0]) * 1024
    return out["VmRSS"], out["RssAnon"], out["RssShmem"]


class RssWatch(threading.Thread):
    """Every 0.1 s, the maximum RSS (and its anonymous and shared parts) of each worker."""

    def __init__(self, pids: dict[int, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.stop = threading.Event()
        self.peak: dict[int, tuple[int, int, int]] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            for wid, pid in self.pids.items():
                try:
                    now = rss_parts(pid)
                except OSError:
                    continue
                old = self.peak.get(wid, (0, 0, 0))
                self.peak[wid] = (max(old[0], now[0]), max(old[1], now[1]), max(old[2], now[2]))
            self.stop.wait(0.1)


def measure(c: Any, phase: Phase, seconds: float, value: bytes, pids: dict[int, int]) -> None:
    watch = RssWatch(pids)
    watch.start()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            got = c.get([HIT_KEY], timeout=5)[0]
        except LMCachedError:
            phase.errors += 1
            continue
        dt = (time.perf_counter() - t0) * 1000
        if got is None or bytes(got) != value:
            # Evicted by the stream (or wrong): not a CPU hit, so not a sample; put it back.
            phase.misses += 1
            del got
            c.put([HIT_KEY], [value])
            continue
        del got
        phase.lat_ms.append(dt)
        time.sleep(0.002)  # a reader, not a load of its own
    watch.stop.set()
    watch.join()
    phase.rss = watch.peak


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpu-budget", default="256MiB", help="max_local_cpu_size (all workers)")
    ap.add_argument("--value-kib", type=int, default=4, help="size of the probed block")
    ap.add_argument("--streams", default="metas,keys,largest")
    ap.add_argument(
        "--stream-over-zmq",
        action="store_true",
        help="the putting client sends its blocks over ZMQ (shared memory off), as a tcp client",
    )
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lmhitlat-"))
    value = os.urandom(args.value_kib * 1024)
    phases: list[Phase] = []
    budget: dict[int, int] = {}
    print(
        f"hit latency: {args.workers} workers, CPU budget {args.cpu_budget}, probe "
        f"{args.value_kib} KiB, {args.seconds:.0f} s per phase, a fresh daemon per stream (a "
        f"worker's heap does not shrink, so RSS is one stream's); load "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    for n, kind in enumerate(args.streams.split(",")):
        daemon = DaemonProcess(
            work / f"daemon-{kind}",
            num_workers=args.workers,
            max_local_cpu_size=args.cpu_budget,
            metrics_port=None,
        )
        try:
            daemon.start()
            phases += run_stream(daemon, kind, args, value, budget, first=n == 0)
        finally:
            daemon.close()
    shutil.rmtree(work, ignore_errors=True)
    return report(phases, budget)


def mean_put_ms(c: Any) -> float:
    """The workers' mean put service time so far: how long one put holds a request loop."""
    total, count = 0.0, 0
    for w in c.stats(timeout=30)["workers"]:
        hist = (w.get("stats") or {}).get("latency", {}).get("latency", {}).get("put")
        if hist:
            total += float(hist["sum"])
            count += sum(hist["counts"])
    return 1000 * total / count if count else float("nan")


def run_stream(
    daemon: DaemonProcess,
    kind: str,
    args: argparse.Namespace,
    value: bytes,
    budget: dict[int, int],
    first: bool,
) -> list[Phase]:
    """Quiet, then under the ``kind`` stream, against one fresh daemon."""
    ctx = mp.get_context("spawn")
    with daemon.client(timeout=30) as c:
        ws = c.stats(timeout=30)["workers"]
        pids = {int(w["id"]): int(w["pid"]) for w in ws}
        budget.update({int(w["id"]): int(w["stats"]["store"]["cpu"]["capacity_bytes"]) for w in ws})
        if first:
            limits = c._cluster.ensure(time.monotonic() + 30).limits
            per = ", ".join(f"w{i} {b / MiB:.0f} MiB" for i, b in budget.items())
            print(f"per-worker CPU budget: {per}; limits {limits.as_dict()}", flush=True)
        c.put([HIT_KEY], [value])
        for _ in range(200):  # warm the path (maps, connections)
            c.get([HIT_KEY])
        quiet = Phase(f"quiet/{kind}")
        measure(c, quiet, args.seconds, value, pids)
        stop, puts = ctx.Event(), ctx.Value("q", 0)
        proc = ctx.Process(
            target=stream,
            args=(str(daemon.config_path), kind, stop, puts, not args.stream_over_zmq),
        )
        proc.start()
        try:
            wait_until(
                lambda: puts.value > 0 or not proc.is_alive(),
                60,
                what=f"the {kind} stream to start",
            )
            phase = Phase(kind, quiet=quiet)
            measure(c, phase, args.seconds, value, pids)
            phase.puts = int(puts.value)
            phase.put_ms = mean_put_ms(c)
        finally:
            stop.set()
            proc.join(60)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if proc.exitcode not in (0, None):
            print(f"  the {kind} stream exited with {proc.exitcode}", flush=True)
        if not all(psutil.pid_exists(p) for p in pids.values()):
            print(f"  a worker died during the {kind} stream", flush=True)
            phase.errors += 1
        if phase.errors or not phase.lat_ms:
            print(f"daemon log tail:\n{daemon.log()[-2000:]}", flush=True)
    return [quiet, phase]


def report(phases: list[Phase], budget: dict[int, int]) -> int:
    print(
        f"\n{'phase':<14} {'hits':>6} {'p50_ms':>7} {'p99_ms':>7} {'max_ms':>7} {'miss':>5} "
        f"{'err':>4} {'puts':>8} {'put_ms':>7} {'p99_lim':>7}  worker peak RSS MiB (anon/shm) vs budget+64"
    )
    ok = True
    for p in phases:
        rss_ok = all(v[0] <= budget[w] + SLACK for w, v in p.rss.items())
        limit = float("nan")
        lat_ok = True
        if p.quiet is not None:
            limit = 2 * p.quiet.pct(0.99) + 10.0
            lat_ok = p.pct(0.99) <= limit and max(p.lat_ms, default=0) <= 100
        good = rss_ok and lat_ok and p.errors == 0 and bool(p.lat_ms)
        ok &= good
        cells = "  ".join(
            f"w{w} {v[0] / MiB:.0f} ({v[1] / MiB:.0f}/{v[2] / MiB:.0f}) / "
            f"{(budget[w] + SLACK) / MiB:.0f}"
            for w, v in sorted(p.rss.items())
        )
        print(
            f"{p.name:<14} {len(p.lat_ms):>6} {p.pct(0.5):>7.2f} {p.pct(0.99):>7.2f} "
            f"{max(p.lat_ms, default=float('nan')):>7.2f} {p.misses:>5} {p.errors:>4} "
            f"{p.puts:>8} {p.put_ms:>7.2f} {limit:>7.2f}  {cells}  {'ok' if good else 'MISSED'}"
        )
    print(
        "targets: p99 <= 2 x the quiet p99 before it + 10 ms (p99_lim), max <= 100 ms, "
        f"RSS <= budget + 64 MiB; load now {os.getloadavg()[0]:.2f}"
    )
    print("VERDICT: PASS" if ok else "VERDICT: FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
