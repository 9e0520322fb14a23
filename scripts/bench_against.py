#!/usr/bin/env python3
"""Compare `lmcached bench` of this checkout against another checkout, interleaved, in one run.

    python scripts/bench_against.py /path/to/old/checkout --rounds 3 -- --workload throughput,lookup

Each round runs the other checkout's bench, then this one's (each with PYTHONPATH pointing at
its own tree, so the daemon it starts runs that tree's code). Alternating spreads the machine's
drift over both sides. The table gives every figure's median per side, the ratio new/old, and
the old side's own spread (max/min), so a ratio can be read against the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run_bench(tree: Path, bench_args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "lmcached", "bench", *bench_args, "--json", str(out)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def figures(doc: dict) -> dict[str, float]:
    """Flatten one bench report into named figures (higher GB/s is better, lower µs is)."""
    out: dict[str, float] = {}
    for row in doc.get("rows", []):
        name = f"{row['op']} {row['size'] // 1024}KiB {row['transport']} x{row['clients']} GB/s"
        out[name] = float(row["gbps"])
    lookup = doc.get("lookup") or {}
    if "p50_us" in lookup:
        out["lookup 128 keys p50 us"] = float(lookup["p50_us"])
        # Its ratio to the bare ZMQ round trip of the same run drifts less with machine load.
        out["lookup p50 / bare zmq p50 x"] = float(lookup["ratio"])
    if "fresh_p50_us" in lookup:
        out["lookup, prompt new to client, p50 us"] = float(lookup["fresh_p50_us"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_tree", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    argv = sys.argv[1:] if argv is None else argv
    # Everything after `--` goes to `lmcached bench` unchanged.
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1 :]
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for side, tree in (("old", args.old_tree.resolve()), ("new", HERE)):
                print(f"round {i + 1}/{args.rounds}: {side} ({tree})", file=sys.stderr, flush=True)
                doc = run_bench(tree, bench_args, Path(tmp) / f"{side}{i}.json")
                runs[side].append(figures(doc))
    names = [n for n in runs["old"][0] if all(n in r for r in runs["old"] + runs["new"])]
    print(f"{'figure':<42} {'old median':>11} {'new median':>11} {'new/old':>8} {'old spread':>10}")
    for name in names:
        old = [r[name] for r in runs["old"]]
        new = [r[name] for r in runs["new"]]
        om, nm = statistics.median(old), statistics.median(new)
        # For latencies lower is better: report old/new so that > 1 always means "new is faster".
        ratio = om / nm if name.endswith((" us", " x")) else nm / om
        spread = max(old) / min(old) if min(old) > 0 else float("inf")
        print(f"{name:<42} {om:>11.3f} {nm:>11.3f} {ratio:>7.2f}x {spread:>9.2f}x")
    print("(ratio > 1: the new code is faster; latencies and ' x' ratios are compared as old/new)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
