"""A small latency recorder: count, mean, max and percentiles from power-of-two buckets."""

from __future__ import annotations

import threading

# Bucket i holds samples below 2**i microseconds; 32 buckets reach about 71 minutes.
_BUCKETS = 32


class LatencyStat:
    """Record durations cheaply (no allocation per sample) and summarise them for stats."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        us = int(seconds * 1e6)
        bucket = min(us.bit_length(), _BUCKETS - 1)
        with self._lock:
            self._counts[bucket] += 1
            self.count += 1
            self.total += seconds
            if seconds > self.max:
                self.max = seconds

    def _percentile_ms(self, q: float) -> float:
        # The upper edge of the bucket holding the q-th sample: an upper bound within 2x.
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self._counts):
            seen += n
            if seen >= rank and n:
                return (1 << i) / 1000.0
        return 0.0

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            if not self.count:
                return {"count": 0, "avg_ms": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
            return {
                "count": self.count,
                "avg_ms": round(self.total / self.count * 1000, 3),
                "p50_ms": self._percentile_ms(0.5),
                "p99_ms": self._percentile_ms(0.99),
                "max_ms": round(self.max * 1000, 3),
            }
