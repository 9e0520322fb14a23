"""The `lmcached bench` workloads beyond raw throughput, and their redis-py baselines.

- ``mixed``: a Zipf-distributed prompt-reuse trace. Each request looks up its prompt's chunk
  keys, retrieves the leading hits into reused memory (as an engine loads KV) and stores the
  misses, against a daemon whose CPU budget holds only part of the working set. The same trace
  runs against a plain redis-server (``maxmemory`` = the same budget, ``allkeys-lru``) through
  redis-py, in the same run.
- ``tiers``: retrieve throughput from each tier that this build has (CPU always; disk and
  remote when their config keys exist), next to memcpy, raw ZMQ and redis-py GET.

Also here: ``--plot``.
"""

from __future__ import annotations

import bisect
import importlib.util
import itertools
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from lmcached.bench.common import MiB, ProgressBar, memcpy_gbps


# ------------------------------------------------------------------------------ baselines
@contextmanager
def redis_server(payload_budget: int | None = None) -> Iterator[Any]:
    """Yield a redis-py client of a private redis-server, or None when none is installed.

    With ``payload_budget``, redis evicts (allkeys-lru) once it holds that many bytes beyond
    what it used empty, so it caches under the same budget as the daemon it is compared with.
    """
    import shutil

    if shutil.which("redis-server") is None:
        yield None
        return
    import redis

    from lmcached.testing import RedisServer

    server = RedisServer().start()
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=60)
    try:
        if payload_budget is not None:
            empty = int(client.info("memory")["used_memory"])
            # Per-key overhead is about 100 bytes; 10 % headroom covers it for blocks >= 4 KiB.
            client.config_set("maxmemory", empty + int(payload_budget * 1.1))
            client.config_set("maxmemory-policy", "allkeys-lru")
        yield client
    finally:
        client.close()
        server.close()


def redis_set_get_gbps(r: Any, size: int, total: int) -> tuple[float, float]:
    """Plain redis-py SET and GET of one ``size``-byte value, as GB/s."""
    value = os.urandom(size)
    n = max(4, total // size)
    keys = [f"bench/redis/{size}/{i}" for i in range(min(n, max(1, (256 * MiB) // size)))]
    t = time.perf_counter()
    for i in range(n):
        r.set(keys[i % len(keys)], value)
    set_gbps = n * size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for i in range(n):
        got = r.get(keys[i % len(keys)])
        if got is None:
            raise RuntimeError("bench: redis lost a value it was given room for")
    get_gbps = n * size / (time.perf_counter() - t) / 1e9
    r.delete(*keys)
    return set_gbps, get_gbps


def redis_exists_p50_us(r: Any, keys: Sequence[bytes], n: int) -> float:
    """Median time of one EXISTS over all ``keys`` (one round trip), in microseconds."""
    r.mset({k: b"x" for k in keys})
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        r.exists(*keys)
        samples.append(time.perf_counter() - t)
    r.delete(*keys)
    return statistics.median(samples) * 1e6


# ------------------------------------------------------------------------------ mixed
def zipf_trace(prompts: int, requests: int, s: float, seed: int) -> list[int]:
    """Return ``requests`` prompt ids drawn with Zipf(s) popularity (id 0 the most popular)."""
    rng = random.Random(seed)
    weights = [1.0 / (rank**s) for rank in range(1, prompts + 1)]
    cumulative = list(itertools.accumulate(weights))
    top = cumulative[-1]
    return [bisect.bisect_left(cumulative, rng.random() * top) for _ in range(requests)]


def prompt_keys(prompts: int, chunks: int, chunk_size: int) -> list[list[bytes]]:
    """Chunk keys of ``prompts`` distinct prompts of ``chunks`` chunks each (lmcached.keys)."""
    from lmcached.keys import KeyBuilder

    kb = KeyBuilder(namespace="bench", model="mixed", chunk_size=chunk_size)
    return [
        kb.chunk_keys([p * 1_000_003 + t for t in range(chunks * chunk_size)])
        for p in range(prompts)
    ]


def replay(
    trace: Sequence[int],
    keys: Sequence[Sequence[bytes]],
    lookup: Callable[[Sequence[bytes]], int],
    retrieve: Callable[[Sequence[bytes]], None],
    store: Callable[[Sequence[bytes]], None],
    tick: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Run the trace: lookup, retrieve the leading hits, store the rest; return figures."""
    asked = served = 0
    t = time.perf_counter()
    for i, p in enumerate(trace):
        ks = keys[p]
        hit = lookup(ks)
        if hit:
            retrieve(ks[:hit])
        if hit < len(ks):
            store(ks[hit:])
        asked += len(ks)
        served += hit
        if i % 50 == 0:
            tick()
    dt = time.perf_counter() - t
    return {"requests_per_s": len(trace) / dt, "hit_rate": served / asked, "seconds": dt}


def run_mixed(
    params: dict[str, Any], bar: ProgressBar, daemon_overrides: dict[str, Any]
) -> dict[str, Any]:
    """The Zipf reuse trace against lmcached, then plain redis-py, same budget, same run."""
    from lmcached.client import Client
    from lmcached.testing import DaemonProcess

    block = int(params["block_size"])
    chunks = int(params["chunks_per_prompt"])
    trace = zipf_trace(int(params["prompts"]), int(params["requests"]), params["zipf_s"], 7)
    keys = prompt_keys(int(params["prompts"]), chunks, 256)
    unique = len(set(trace)) * chunks * block
    budget = max(block * chunks, int(unique * params["budget_fraction"]))
    value = os.urandom(block)
    sinks = [bytearray(block) for _ in range(chunks)]  # reused memory, as an engine's KV cache
    out: dict[str, Any] = {
        **params,
        "budget_bytes": budget,
        "working_set_bytes": unique,
        "memcpy_gbps": memcpy_gbps(block, 64 * block),
    }

    bar.step("mixed: lmcached (Zipf trace)")
    overrides = {**daemon_overrides, "max_local_cpu_size": f"{budget}B", "num_workers": 2}
    with DaemonProcess(**overrides) as d, Client(d.endpoint, timeout=60) as c:

        def get_into(ks: Sequence[bytes]) -> None:
            c.get_into(list(ks), sinks[: len(ks)])

        res = replay(trace, keys, c.lookup, get_into, lambda ks: c.put(list(ks), [value] * len(ks)))
    res["retrieved_gbps"] = res["hit_rate"] * len(trace) * chunks * block / res["seconds"] / 1e9
    out["lmcached"] = res

    bar.step("mixed: plain redis-py (same trace, same budget)")
    with redis_server(payload_budget=budget) as r:
        if r is None:
            out["redis"] = None
        else:

            def r_lookup(ks: Sequence[bytes]) -> int:
                pipe = r.pipeline(transaction=False)
                for k in ks:
                    pipe.exists(k)
                hit = 0
                for flag in pipe.execute():
                    if not flag:
                        break
                    hit += 1
                return hit

            def r_retrieve(ks: Sequence[bytes]) -> None:
                pipe = r.pipeline(transaction=False)
                for k in ks:
                    pipe.get(k)
                for sink, v in zip(sinks, pipe.execute(), strict=False):
                    if v is not None:
                        sink[: len(v)] = v  # same copy into reused memory as get_into

            def r_store(ks: Sequence[bytes]) -> None:
                pipe = r.pipeline(transaction=False)
                for k in ks:
                    pipe.set(k, value)
                pipe.execute()

            rr = replay(trace, keys, r_lookup, r_retrieve, r_store)
            rr["retrieved_gbps"] = (
                rr["hit_rate"] * len(trace) * chunks * block / rr["seconds"] / 1e9
            )
            out["redis"] = rr
            out["ratio_requests_per_s"] = res["requests_per_s"] / rr["requests_per_s"]
    return out


# ------------------------------------------------------------------------------ tiers
def available_tiers() -> list[str]:
    """Tiers this build can be configured with: cpu, plus disk/remote when their keys exist."""
    from lmcached.config import key_names

    names = set(key_names())
    tiers = ["cpu"]
    if "local_disk" in names:
        tiers.append("disk")
    if "remote_url" in names:
        tiers.append("remote")
    return tiers


def _tier_retrieve(overrides: dict[str, Any], block: int, count: int) -> dict[str, Any]:
    from lmcached.client import Client
    from lmcached.testing import DaemonProcess

    value = os.urandom(block)
    keys = [b"bench/tiers/%d" % i for i in range(count)]
    sink = bytearray(block)
    with DaemonProcess(**overrides) as d, Client(d.endpoint, timeout=60) as c:
        for i in range(0, count, 8):
            c.put(keys[i : i + 8], [value] * len(keys[i : i + 8]))
        c.flush()
        lat = []
        hits = 0
        t = time.perf_counter()
        for k in keys:
            t1 = time.perf_counter()
            hits += c.get_into([k], [sink])[0]
            lat.append(time.perf_counter() - t1)
        dt = time.perf_counter() - t
    lat.sort()
    return {
        "gbps": hits * block / dt / 1e9,
        "hits": hits,
        "asked": count,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


def run_tiers(
    block: int,
    count: int,
    bar: ProgressBar,
    daemon_overrides: dict[str, Any],
    zmq_retrieve_gbps: Callable[[int], float],
) -> dict[str, Any]:
    """Retrieve throughput per tier, next to memcpy, raw ZMQ and redis-py GET."""
    out: dict[str, Any] = {"block_size": block, "blocks": count, "rows": []}
    bar.step("tiers: baselines")
    out["memcpy_gbps"] = memcpy_gbps(block, count * block)
    out["zmq_retrieve_gbps"] = zmq_retrieve_gbps(block)
    with redis_server() as r:
        out["redis_get_gbps"] = (
            None if r is None else redis_set_get_gbps(r, block, count * block)[1]
        )
    detailed = importlib.util.find_spec("lmcached.bench.tiers") is not None
    with tempfile.TemporaryDirectory(prefix="lmbench-") as tmp:
        for tier in available_tiers():
            if detailed and tier != "cpu":
                continue  # the tiers' own section below measures disk and remote in depth
            bar.step(f"tiers: {tier}")
            overrides = {**daemon_overrides, "max_local_cpu_size": f"{4 * count * block}B"}
            if tier != "cpu":
                # No CPU budget: every retrieve must come from the tier under test.
                overrides["local_cpu"] = False
            if tier == "disk":
                overrides.update(
                    local_disk=os.path.join(tmp, "disk"),
                    max_local_disk_size=f"{4 * count * block}B",
                )
            if tier == "remote":
                with redis_server() as r:
                    if r is None:
                        continue
                    port = r.connection_pool.connection_kwargs["port"]
                    overrides["remote_url"] = f"redis://127.0.0.1:{port}"
                    row = _tier_retrieve(overrides, block, count)
            else:
                row = _tier_retrieve(overrides, block, count)
            row["tier"] = tier
            row["ratio_to_memcpy"] = row["gbps"] / out["memcpy_gbps"]
            row["ratio_to_zmq"] = row["gbps"] / out["zmq_retrieve_gbps"]
            if out["redis_get_gbps"]:
                row["ratio_to_redis"] = row["gbps"] / out["redis_get_gbps"]
            out["rows"].append(row)
    if detailed:
        from lmcached.bench import tiers as bench_tiers

        bar.step("tiers: disk and remote (lmcached.bench.tiers)")
        out["detail"] = bench_tiers.run_tiers(quick=block < MiB, repeats=1 if block < MiB else 3)
    return out


# ------------------------------------------------------------------------------ plot
def plot(report: Any, path: str) -> None:
    """Draw throughput against block size for lmcached and its baselines (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "lmcached bench --plot needs matplotlib: pip install 'lmcached[plot]'"
        ) from None
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report.rows:
        series.setdefault(f"lmcached {r.op} {r.transport} x{r.clients}", []).append(
            (r.size, r.gbps)
        )
    for key, g in report.zmq.items():
        op, tr, size = key.split("/")
        series.setdefault(f"raw zmq {op} {tr}", []).append((int(size), g))
    for size, g in report.memcpy.items():
        series.setdefault("memcpy", []).append((int(size), g))
    for key, g in (report.redis or {}).items():
        op, _, size = key.partition("/")
        if size.isdigit():
            series.setdefault(f"redis-py {op}", []).append((int(size), g))
    for label, points in sorted(series.items()):
        points.sort()
        style = "--" if not label.startswith("lmcached") else "-"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # memcpy is 10x the rest; a log axis keeps every line readable
    ax.set_xlabel("block size (bytes)")
    ax.set_ylabel("GB/s")
    ax.set_title("lmcached throughput vs baselines (same run)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
