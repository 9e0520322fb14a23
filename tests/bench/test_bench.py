"""`lmcached bench --json` on a tiny size emits the documented fields (no speed asserts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

ROW_FIELDS = {
    "memcpy_ratio",
    "op",
    "size",
    "transport",
    "clients",
    "gbps",
    "p50_ms",
    "p99_ms",
    "baseline_gbps",
    "ratio",
    "redis_gbps",
    "redis_ratio",
}


def test_bench_json_documents_every_workload(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "lmcached",
        "bench",
        "--quick",
        "--workload",
        "all",
        "--transports",
        "shm,ipc",
        "--json",
        "-",
    ]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if has_matplotlib:
        cmd += ["--plot", str(tmp_path / "bench.png")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    doc = json.loads(out.stdout)
    assert doc["workloads"] == ["throughput", "lookup", "mixed", "tiers"]
    # The table and the progress bar went to stderr.
    assert "baselines (same run)" in out.stderr and "bench finished" in out.stderr

    # throughput: memcpy, raw ZMQ and redis-py baselines next to every lmcached row.
    assert set(doc["memcpy"]) == {str(64 << 10), str(1 << 20)}
    assert {"store/ipc/65536", "retrieve/ipc/1048576"} <= set(doc["zmq"])
    assert {"set/65536", "get/1048576"} <= set(doc["redis"])
    assert {(r["op"], r["transport"]) for r in doc["rows"]} == {
        *((op, tr) for op in ("store", "retrieve", "retrieve_into") for tr in ("shm", "ipc")),
        ("store_buffer", "shm"),  # a put from Client.buffer, same host only
    }
    for row in doc["rows"]:
        assert set(row) == ROW_FIELDS
        assert row["gbps"] > 0 and row["ratio"] > 0 and row["redis_ratio"] > 0

    # The idle-USS target's figures: at the start, and after the runs without the arena.
    workers = 2
    assert len(doc["memory"]["idle_worker_uss_mb"]) == workers
    after = doc["memory"]["worker_uss_after_mb"]
    assert len(after) == workers and all(0 < mb < 1000 for mb in after)

    lookup = doc["lookup"]
    assert lookup["keys"] == 128 and lookup["tokens"] == 32768
    assert {"p50_us", "bare_zmq_p50_us", "ratio", "redis_exists_p50_us", "redis_ratio"} <= set(
        lookup
    )
    assert lookup["fresh_p50_us"] > 0 and lookup["fresh_ratio"] > 0

    mixed = doc["mixed"]
    for name in ("lmcached", "redis"):
        assert {"requests_per_s", "hit_rate", "retrieved_gbps"} <= set(mixed[name])
        assert 0 < mixed[name]["hit_rate"] < 1  # the budget holds a quarter of the working set
    assert mixed["budget_bytes"] < mixed["working_set_bytes"]
    assert {"memcpy_gbps", "ratio_requests_per_s", "zipf_s"} <= set(mixed)

    tiers = doc["tiers"]
    assert {"memcpy_gbps", "zmq_retrieve_gbps", "redis_get_gbps", "block_size"} <= set(tiers)
    cpu = next(r for r in tiers["rows"] if r["tier"] == "cpu")
    assert cpu["hits"] == cpu["asked"]
    assert {"gbps", "p50_ms", "p99_ms", "ratio_to_memcpy", "ratio_to_zmq", "ratio_to_redis"} <= set(
        cpu
    )
    if has_matplotlib:
        assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
