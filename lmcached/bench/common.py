"""What every `lmcached bench` workload shares: the result records, progress output, memcpy.

A leaf of the bench package: the workload modules import it, it imports none of them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20


@dataclass
class Row:
    op: str
    size: int
    transport: str
    clients: int
    gbps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    baseline_gbps: float | None = None
    ratio: float | None = None
    redis_gbps: float | None = None  # plain redis-py SET (store) / GET (retrieve), same size
    redis_ratio: float | None = None
    memcpy_ratio: float | None = None  # against the memcpy of the same block size, same run


@dataclass
class Report:
    memcpy: dict[str, float] = field(default_factory=dict)
    zmq: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    lookup: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    # Workload sections (the README's "Benchmarks" section lists every field).
    workloads: list[str] = field(default_factory=list)
    redis: dict[str, float] = field(default_factory=dict)
    mixed: dict[str, Any] = field(default_factory=dict)
    tiers: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ progress
class ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, stream: Any = None, width: int = 28) -> None:
        self.total = max(1, total)
        self.done = 0
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.monotonic()

    def step(self, label: str) -> None:
        """Announce the step about to run (and count the previous one as done)."""
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self.started
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s  {label}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:160])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.done = min(self.total, self.done + 1)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"bench finished in {time.monotonic() - self.started:.0f}s\n")
        self.stream.flush()


# The run's progress bar (set by the throughput run for its steps); None: plain lines.
_BAR: ProgressBar | None = None


def set_progress_bar(bar: ProgressBar | None) -> None:
    """Send :func:`progress` to ``bar`` (None: plain lines on stderr)."""
    global _BAR
    _BAR = bar


def progress(msg: str) -> None:
    """Announce the step about to run, on the run's progress bar or as a plain line."""
    if _BAR is not None:
        _BAR.step(msg)
    else:
        print(f"  .. {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ baselines
def memcpy_gbps(size: int, total: int) -> float:
    """Single-thread DRAM-to-DRAM copy of ``size``-byte blocks into preallocated memory.

    Source and destination slots rotate through 256 MiB each, far beyond the last-level cache,
    so small blocks are not measured from cache (what a KV transfer never enjoys).
    """
    slots = max(1, (256 << 20) // size)
    src = bytearray(os.urandom(1 << 20)) * max(1, (slots * size) >> 20)
    src.extend(bytes(slots * size - len(src)))
    dst = bytearray(slots * size)
    base_s = ctypes.addressof((ctypes.c_char * len(src)).from_buffer(src))
    base_d = ctypes.addressof((ctypes.c_char * len(dst)).from_buffer(dst))
    ctypes.memmove(base_d, base_s, len(dst))  # touch every page once
    n = max(4, total // size)
    t = time.perf_counter()
    for i in range(n):
        off = (i % slots) * size
        ctypes.memmove(base_d + ((i * 7 + 3) % slots) * size, base_s + off, size)
    return n * size / (time.perf_counter() - t) / 1e9
