"""Replay access traces against eviction policies and count hits (deterministic; no timing).

The workload that separates policies is a hot set reused all the time, interrupted by one-time
scans larger than the cache (a batch job reading many prompts once). LRU moves every scanned
block to the front and so evicts the whole hot set at each scan; a scan-resistant policy
(S3-FIFO) lets scanned blocks leave through its small probationary queue.

``python -m lmcached.storage.eviction_trace`` prints the comparison; ``lmcached bench`` can call
:func:`compare`. Hit counts depend only on the seed, so tests assert on them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lmcached.storage.base import Block
from lmcached.storage.cpu import CPUBackend, entry_cost


@dataclass(frozen=True)
class TraceResult:
    policy: str
    accesses: int
    hits: int

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


def scan_workload(
    *,
    hot_keys: int = 100,
    hot_run: int = 1000,
    scan_length: int = 300,
    rounds: int = 6,
    seed: int = 0,
) -> list[bytes]:
    """Return a trace: runs of accesses to a hot set, each followed by a one-time scan."""
    rng = random.Random(seed)
    hot = [b"hot/%d" % i for i in range(hot_keys)]
    trace: list[bytes] = []
    scanned = 0
    for _ in range(rounds):
        trace.extend(rng.choice(hot) for _ in range(hot_run))
        trace.extend(b"scan/%d" % (scanned + i) for i in range(scan_length))
        scanned += scan_length
    trace.extend(rng.choice(hot) for _ in range(hot_run))
    return trace


def replay(
    policy: str, trace: Sequence[bytes], capacity_blocks: int, block_size: int = 64
) -> TraceResult:
    """Run ``trace`` through a CPU tier of ``capacity_blocks`` blocks; read-through on a miss."""
    # Room for capacity_blocks entries: the budget charges each its key and a fixed overhead too.
    per_entry = entry_cost(max(trace, key=len, default=b""), block_size, None, arena=False)
    tier = CPUBackend(capacity_blocks * per_entry, policy)
    payload = bytes(block_size)
    hits = 0
    try:
        for key in trace:
            if tier.get(key) is not None:
                hits += 1
            else:
                tier.put(key, Block.from_bytes(payload))
    finally:
        tier.close()
    return TraceResult(policy, len(trace), hits)


def compare(
    policies: Sequence[str] = ("lru", "s3fifo"),
    *,
    capacity_blocks: int = 150,
    seed: int = 0,
) -> list[TraceResult]:
    """Replay the scan workload against each policy, the baseline (LRU) first."""
    trace = scan_workload(seed=seed)
    return [replay(p, trace, capacity_blocks) for p in policies]


def summary_lines() -> list[str]:
    """Return the comparison as text lines, the LRU baseline first (for ``lmcached bench``)."""
    results = compare()
    base = results[0]
    lines = [
        f"eviction, scan workload ({base.accesses} accesses, 150-block cache, hot set of 100, "
        "6 one-time scans of 300):",
    ]
    for r in results:
        lines.append(
            f"  {r.policy:<8} hits {r.hits:>6}  hit ratio {r.hit_ratio:.3f}  "
            f"{r.hits / base.hits:.2f}x {base.policy}"
        )
    return lines


def main() -> int:
    print("\n".join(summary_lines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
