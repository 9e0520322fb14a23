"""kill -9 loop: no flushed block is lost, no byte is wrong, no process of a killed one survives.

Runs ``lmcached`` (DaemonProcess) with a disk tier, a real Redis remote tier
(lmcached.testing.RedisServer) and a script plugin in every process (so there are plugin shims
and plugin grandchildren to kill and to leave behind). Each round:

1. a client puts batches of blocks and calls ``flush()`` after each batch; the blocks of a
   batch count as *flushed* only when its put returned and the next ``flush()`` returned a
   report with ``complete`` (a call that raised makes its pending blocks unknown, not flushed);
2. meanwhile, at a random moment, one lmcached process is killed with ``kill -9``: the
   scheduler, a worker or a plugin shim, chosen at random;
3. the killed process and its descendants must be gone within ``--orphan-wait`` seconds
   (survivors are counted); if the scheduler died, the daemon is restarted, otherwise the
   supervisor restarts what it owns;
4. a fresh client reads back every block flushed so far (all rounds): 0 missing and 0 wrong
   bytes is the target.

At the end the daemon is stopped and every process ever seen in its tree (matched by pid and
start time) must be gone. A table row per round, then a verdict; exit status 0 when it holds.

    python scripts/torture_kill9.py --rounds 10
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import xxhash

from lmcached import LMCachedError
from lmcached.testing import DaemonProcess, RedisServer, wait_until

KiB = 1 << 10
REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin_examples" / "all_heartbeat.sh"

Ident = tuple[int, float]  # (pid, create time): a pid alone may be reused


def value_of(key: bytes, size: int) -> bytes:
    """The one value ever stored under ``key``: a wrong byte anywhere is detectable."""
    return (xxhash.xxh3_128_digest(key) * (size // 16 + 1))[:size]


def ident(p: psutil.Process) -> Ident | None:
    with contextlib.suppress(psutil.Error):
        return (p.pid, p.create_time())
    return None


def alive(i: Ident) -> bool:
    try:
        p = psutil.Process(i[0])
        return p.create_time() == i[1] and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(i: Ident) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{i[0]} {' '.join(psutil.Process(i[0]).cmdline())[:100]}"
    return str(i[0])


def subtree(pid: int) -> set[Ident]:
    """``pid`` and its descendants now."""
    out: set[Ident] = set()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        i = ident(p)
        if i is not None:
            out.add(i)
    return out


@dataclass
class Target:
    role: str  # scheduler | worker N | shim of ...
    pid: int


def targets(daemon: DaemonProcess) -> list[Target]:
    """Every lmcached process of the daemon now: the scheduler, its workers, the plugin shims."""
    assert daemon.proc is not None
    out = [Target("scheduler", daemon.proc.pid)]
    try:
        procs = psutil.Process(daemon.proc.pid).children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.cmdline())
            if "lmcached.daemon.worker" in cmd:
                out.append(Target("worker", p.pid))
            elif "shim.py" in cmd:
                parent = p.ppid()
                owner = "scheduler" if parent == daemon.proc.pid else "worker"
                out.append(Target(f"shim({owner})", p.pid))
    return out


@dataclass
class Round:
    n: int
    killed: str = ""
    kill_at: float = 0.0
    batches: int = 0
    flushed: int = 0  # blocks newly counted as flushed this round
    incomplete: int = 0  # flushes that returned a report with losses
    reported: dict[str, int] = field(default_factory=dict)  # their dropped/failed/unconfirmed
    errors: int = 0  # put/flush calls that raised (around the kill)
    survivors: list[str] = field(default_factory=list)
    recover_s: float = 0.0
    checked: int = 0
    missing: int = 0
    wrong: int = 0
    note: str = ""


class Killer(threading.Thread):
    """Sleep a random time, then kill -9 one random lmcached process; record what it killed."""

    def __init__(self, daemon: DaemonProcess, rng: random.Random, max_delay: float) -> None:
        super().__init__(daemon=True)
        self.daemon_proc = daemon
        self.delay = rng.uniform(0.0, max_delay)
        self.rng = rng
        self.done = threading.Event()
        self.target: Target | None = None
        self.tree: set[Ident] = set()
        self.at = 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        time.sleep(self.delay)
        try:
            choices = targets(self.daemon_proc)
            kinds = sorted({t.role for t in choices})
            kind = self.rng.choice(kinds)  # each kind equally likely, not each process
            self.target = self.rng.choice([t for t in choices if t.role == kind])
            self.tree = subtree(self.target.pid)
            os.kill(self.target.pid, signal.SIGKILL)
        except (ProcessLookupError, psutil.Error) as exc:
            self.target = Target(f"none ({exc})", 0)
        self.at = time.monotonic() - t0
        self.done.set()


def put_until_killed(
    c: Any,
    killer: Killer,
    rng: random.Random,
    prefix: str,
    batch: int,
    block: int,
    row: Round,
    flushed: list[bytes],
    timeout: float,
) -> None:
    """Put batches and flush after each until the kill happened and one more cycle ran."""
    pending: list[bytes] = []
    after_kill = 0
    seq = 0
    while after_kill < 2:
        if killer.done.is_set():
            after_kill += 1
        keys = [f"{prefix}/b{seq:05d}/{i:03d}".encode() for i in range(batch)]
        seq += 1
        try:
            c.put(keys, [value_of(k, block) for k in keys], timeout=timeout)
            pending.extend(keys)
            row.batches += 1
            report = c.flush(timeout=timeout)
        except LMCachedError as exc:
            row.errors += 1
            row.note = f"{type(exc).__name__}: {str(exc)[:60]}"
            pending = []  # their fate is unknown: not counted as flushed
            time.sleep(0.05)
            continue
        if report.complete:
            flushed.extend(pending)
            row.flushed += len(pending)
        else:
            row.incomplete += 1
            for name in ("dropped", "failed", "unconfirmed"):
                row.reported[name] = row.reported.get(name, 0) + getattr(report, name, 0)
        pending = []
        if rng.random() < 0.1:
            time.sleep(rng.uniform(0, 0.05))


def wait_recovered(daemon: DaemonProcess, workers: int, killed_pid: int, timeout: float) -> None:
    """Wait until every worker is up again (a new pid where one was killed) and answers."""

    def ok() -> bool:
        try:
            with daemon.client(timeout=2) as c:
                ws = c.stats(timeout=2)["workers"]
                pids = [int(w["pid"]) for w in ws if w.get("pid")]
                if len(pids) != workers or killed_pid in pids:
                    return False
                if not all(psutil.pid_exists(p) for p in pids):
                    return False
                c.exists([b"probe/0", b"probe/1", b"probe/2", b"probe/3"], timeout=2)
                return True
        except (LMCachedError, RuntimeError, KeyError, TypeError, ValueError):
            return False

    wait_until(ok, timeout, interval=0.2, what="every worker up again")


def check_flushed(daemon: DaemonProcess, flushed: list[bytes], block: int, row: Round) -> None:
    """Read back every flushed block with a fresh client: count missing and wrong ones."""
    with daemon.client(timeout=30) as c:
        for i in range(0, len(flushed), 64):
            keys = flushed[i : i + 64]
            values = c.get(keys, timeout=30)
            for key, value in zip(keys, values, strict=True):
                row.checked += 1
                if value is None:
                    row.missing += 1
                elif bytes(value) != value_of(key, block):
                    row.wrong += 1
            del values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpu-budget", default="64MiB", help="max_local_cpu_size (all workers)")
    ap.add_argument("--block-kib", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="blocks per put")
    ap.add_argument("--max-kill-delay", type=float, default=2.0, help="seconds into a round")
    ap.add_argument("--orphan-wait", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    block = args.block_kib * KiB
    work = Path(tempfile.mkdtemp(prefix="lmkill9-"))
    plugins = work / "plugins"
    plugins.mkdir(mode=0o755)
    shutil.copy(PLUGIN, plugins / PLUGIN.name)
    os.chmod(plugins / PLUGIN.name, 0o755)
    # Room for every block of the run: a full Redis refuses writes, and the flushes that
    # report those failures honestly would leave nothing flushed to check.
    redis = RedisServer(work / "redis", extra_args=["--maxmemory", "2gb"]).start()
    daemon = DaemonProcess(
        work / "daemon",
        num_workers=args.workers,
        max_local_cpu_size=args.cpu_budget,
        local_disk=str(work / "disk"),
        max_local_disk_size="2GiB",
        remote_url=redis.url,
        remote_timeout=2.0,
        metrics_port=None,
        plugin_locations=[str(plugins)],
        plugin_config={PLUGIN.name: {"settings": {"interval": 5}}},
    )
    ever: set[Ident] = set()  # every process seen in the daemon's tree, over all rounds
    flushed: list[bytes] = []
    rows: list[Round] = []
    print(
        f"kill -9 loop: {args.rounds} rounds, {args.workers} workers, disk + redis + "
        f"{PLUGIN.name} in every process; {args.batch} x {args.block_kib} KiB per put; "
        f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; folder {work}",
        flush=True,
    )
    header = (
        f"{'rnd':>3} {'killed':<16} {'at_s':>5} {'puts':>5} {'flushed':>7} {'incompl':>7} "
        f"{'errors':>6} {'recov_s':>7} {'checked':>7} {'missing':>7} {'wrong':>5} "
        f"{'survivors':>9}  note"
    )
    try:
        daemon.start()
        wait_until(
            lambda: any(t.role.startswith("shim") for t in targets(daemon)),
            30,
            what="the plugin shims",
        )
        roles = sorted(t.role for t in targets(daemon))
        print(f"processes to kill: {roles}", flush=True)
        print(header, flush=True)
        c = daemon.client(timeout=10)
        for n in range(1, args.rounds + 1):
            row = Round(n)
            ever |= subtree(daemon.pid)
            killer = Killer(daemon, rng, args.max_kill_delay)
            killer.start()
            put_until_killed(c, killer, rng, f"k9/r{n:03d}", args.batch, block, row, flushed, 5)
            killer.join()
            assert killer.target is not None
            row.killed, row.kill_at = killer.target.role, killer.at
            ever |= killer.tree
            t0 = time.monotonic()
            # The killed process and everything under it must go (the scheduler's children by
            # their death signal, a shim's plugin by the launcher's subreaper).
            with contextlib.suppress(TimeoutError):
                wait_until(
                    lambda tree=killer.tree: not any(alive(i) for i in tree),
                    args.orphan_wait,
                    interval=0.1,
                    what="the killed process's tree to go",
                )
            row.survivors = [describe(i) for i in killer.tree if alive(i)]
            if row.killed == "scheduler":
                daemon.stop()  # reap it; the log file is reopened by start()
                daemon.start(timeout=60)
            if killer.target.pid:
                wait_recovered(daemon, args.workers, killer.target.pid, 60)
            row.recover_s = time.monotonic() - t0
            check_flushed(daemon, flushed, block, row)
            rows.append(row)
            print(
                f"{row.n:>3} {row.killed:<16} {row.kill_at:>5.2f} {row.batches:>5} "
                f"{row.flushed:>7} {row.incomplete:>7} {row.errors:>6} {row.recover_s:>7.1f} "
                f"{row.checked:>7} {row.missing:>7} {row.wrong:>5} {len(row.survivors):>9}  "
                f"{row.note}",
                flush=True,
            )
            if row.reported:
                print(f"    incomplete flushes reported {row.reported}", flush=True)
            for s in row.survivors:
                print(f"    survivor: {s}", flush=True)
        c.close()
        ever |= subtree(daemon.pid)
        daemon.stop()
        # A clean stop after all the kills: nothing the daemon ever started may be left.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not any(alive(i) for i in ever), args.orphan_wait, interval=0.2)
        left = [describe(i) for i in ever if alive(i)]
        return verdict(rows, flushed, left, daemon)
    finally:
        daemon.close()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


def verdict(rows: list[Round], flushed: list[bytes], left: list[str], d: DaemonProcess) -> int:
    last = rows[-1] if rows else Round(0)
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r.killed] = kinds.get(r.killed, 0) + 1
    survivors = sum(len(r.survivors) for r in rows)
    missing = max((r.missing for r in rows), default=0)
    wrong = sum(r.wrong for r in rows)
    print(f"\nkills: {kinds}")
    print(
        f"flushed blocks: {len(flushed)}; incomplete flush reports: "
        f"{sum(r.incomplete for r in rows)}; calls that raised: {sum(r.errors for r in rows)}"
    )
    print(f"lost flushed blocks (worst round): {missing}; at the end: {last.missing}")
    print(f"wrong bytes (blocks, all rounds): {wrong}")
    print(f"survivors of a killed process: {survivors}; left after the final stop: {len(left)}")
    for s in left:
        print(f"    left: {s}")
    ok = missing == 0 and wrong == 0 and survivors == 0 and not left and bool(rows)
    if not ok:
        print(f"daemon log tail:\n{d.log()[-3000:]}")
    print("VERDICT: PASS" if ok else "VERDICT: FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
