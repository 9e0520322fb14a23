"""Per-op request counters and latency histograms that a worker keeps and reports in `stats`.

Workers cannot share prometheus-client objects (they are separate processes and we refuse the
PROMETHEUS_MULTIPROC_DIR file tricks), so each worker keeps plain bucket counts with fixed
bounds. The scheduler sums the buckets of every worker into one Prometheus histogram; fixed,
shared bounds are what makes that sum exact.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Upper bounds in seconds (+Inf is implicit). From 50 us (a tiny ZMQ round trip is ~27 us) to
# 10 s (the default client deadline).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class LatencyHistogram:
    """Count observations into LATENCY_BUCKETS (non-cumulative; the last slot is +Inf)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus' le).
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def as_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.total}


class OpLatency:
    """Latency histograms per op, plus the retrieve-hit counters, kept by each worker.

    Request counts and lookup hits are in the worker's own ``OpStats``. *Retrieve* hits
    (``get``: "did we return the bytes?") are counted here, apart from *lookup* hits ("would a
    retrieve find it?"): LMCache reported one ratio that mixed both and read 1.0 forever.
    """

    def __init__(self) -> None:
        self.latency: dict[str, LatencyHistogram] = {}
        self.retrieve_keys = 0
        self.retrieve_hits = 0

    def observe(self, op: str, seconds: float) -> None:
        """Record one request of ``op`` that took ``seconds`` from receipt to reply."""
        hist = self.latency.get(op)
        if hist is None:
            hist = self.latency[op] = LatencyHistogram()
        hist.observe(seconds)

    def count_retrieve(self, asked: int, hits: int) -> None:
        """Record a get over ``asked`` keys of which ``hits`` returned bytes."""
        self.retrieve_keys += asked
        self.retrieve_hits += hits

    def as_dict(self) -> dict[str, Any]:
        return {
            "buckets": list(LATENCY_BUCKETS),
            "latency": {op: h.as_dict() for op, h in self.latency.items()},
            "retrieve_keys": self.retrieve_keys,
            "retrieve_hits": self.retrieve_hits,
        }
