"""Same-host put rounds against a running daemon, each beside a memcpy of the same moment.

The bench's figures are ratios to a memcpy measured once per run; on a host whose memory
bandwidth moves within minutes, a round's ratio to a memcpy measured just before it is steadier.
Each round puts 8 calls of 32 MiB (prompt-shaped keys: a call lands on one worker) either from
one ``Client.buffer`` (``--mode buffer``) or from ordinary memory (``--mode direct``).

Each round also says where a call's time went: the workers' own put latency (receipt to reply,
from their ``stats``) against what the client waited. The rest is the client's work and the
two ZMQ hops; on a 2-core VM it was ~1 ms of a ~5 ms call (docs/benchmarks.md).

    python scripts/put_rounds.py --endpoint ipc:///run/lmcached/default/control.sock \\
        --size 2MiB --mode buffer --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from lmcached.bench.common import memcpy_gbps
from lmcached.client import Client
from lmcached.config import byte_size

CALL_BYTES = 32 << 20
CALLS = 8


def worker_put_latency(c: Client) -> tuple[float, int]:
    """Seconds and count of every put the workers answered so far (their own clocks)."""
    total, count = 0.0, 0
    for w in c.stats()["workers"]:
        put = (w.get("stats") or {}).get("latency", {}).get("latency", {}).get("put")
        if put:
            total += put["sum"]
            count += sum(put["counts"])
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--size", default="2MiB", help="block size")
    ap.add_argument("--mode", choices=("buffer", "direct"), default="buffer")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = byte_size(args.size)
    n = max(1, CALL_BYTES // size)
    with Client(args.endpoint, timeout=60, shared_memory=True) as c:
        if args.mode == "buffer":
            buf = c.buffer(size * n)
            buf[:] = os.urandom(size) * n
            values = [buf[i * size : (i + 1) * size] for i in range(n)]
        else:
            value = os.urandom(size)
            values = [value] * n
        calls = [[f"rounds/{j:08x}-{i:x}".encode() for i in range(n)] for j in range(CALLS)]
        for keys in calls:  # warm-up: slots and pages touched once
            c.put(keys, values)
        ratios, outside = [], []
        for r in range(args.rounds):
            copy = memcpy_gbps(size, 128 << 20)
            w_sum, w_count = worker_put_latency(c)
            t = time.perf_counter()
            for keys in calls:
                c.put(keys, values)
            elapsed = time.perf_counter() - t
            w_sum2, w_count2 = worker_put_latency(c)
            gbps = CALLS * n * size / 1e9 / elapsed
            ratios.append(gbps / copy)
            call_ms = elapsed / CALLS * 1e3
            # One request per call (the keys share a route); the stats calls are not counted.
            worker_ms = (w_sum2 - w_sum) / max(1, w_count2 - w_count) * 1e3
            outside.append(call_ms - worker_ms)
            print(
                f"round {r}: put {gbps:.2f} GB/s, memcpy {copy:.2f} GB/s, x{gbps / copy:.2f}; "
                f"per call {call_ms:.2f} ms, in the worker {worker_ms:.2f} ms"
            )
    print(
        f"{args.mode} {args.size}: median x{statistics.median(ratios):.2f} memcpy; "
        f"outside the worker (client and ZMQ) median {statistics.median(outside):.2f} ms a call"
    )


if __name__ == "__main__":
    main()
