"""The metrics collector and HTTP endpoint, fed with real tier and op counters.

The end-to-end scrape of a running daemon is in test_metrics_daemon.py; these tests pin the
aggregation rules (sums across workers, monotonic across restarts, split hit ratios).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmcached.daemon.metrics import ClusterSnapshot, MetricsServer, WorkerSample
from lmcached.daemon.op_latency import LATENCY_BUCKETS, OpLatency
from lmcached.daemon.worker import OpStats
from lmcached.storage.base import Block
from lmcached.storage.cpu import CPUBackend, entry_cost


def worker_stats(worker_id: int, pid: int, puts: int, gets: int) -> dict:
    """Stats as a worker reports them, from a real CPU tier and the worker's op counters."""
    cpu = CPUBackend(capacity_bytes=1 << 20)
    ops, latency = OpStats(), OpLatency()
    for i in range(puts):
        cpu.put(b"k%d" % i, Block.from_bytes(b"x" * 100))
        ops.requests["put"] = ops.requests.get("put", 0) + 1
        latency.observe("put", 0.0003)
    found = sum(cpu.get(b"k%d" % i) is not None for i in range(gets))
    ops.requests["get"] = 1
    latency.observe("get", 0.002)
    latency.count_retrieve(gets, found)
    ops.lookup_keys += 4
    ops.lookup_hits += 1
    return {
        "worker_id": worker_id,
        "pid": pid,
        "store": {"cpu": cpu.stats()},
        "ops": ops.as_dict(),
        "latency": latency.as_dict(),
    }


def scrape(snapshot: ClusterSnapshot) -> dict[str, dict]:
    """Render through prometheus-client's exposition and parse it back with its parser."""
    server = MetricsServer("127.0.0.1", 0, lambda: snapshot)
    text = generate_latest(server.registry).decode()
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_tier_and_op_counters_are_summed_across_workers():
    snap = ClusterSnapshot(
        workers=[
            WorkerSample(0, worker_stats(0, 100, puts=3, gets=5), 0.001),
            WorkerSample(1, worker_stats(1, 101, puts=2, gets=1), 0.001),
        ],
        expected_workers=2,
        deadline=1.0,
    )
    m = scrape(snap)
    cpu = (("tier", "cpu"),)
    assert m["lmcached_tier_hits_total"][cpu] == 3 + 1
    assert m["lmcached_tier_misses_total"][cpu] == 2 + 0
    # 5 entries of 100 bytes, each charged payload + key + a fixed overhead.
    assert m["lmcached_tier_stored_bytes"][cpu] == 5 * entry_cost(b"k0", 100, None, arena=False)
    assert m["lmcached_tier_queue_drops_total"][cpu] == 0
    assert m["lmcached_tier_checksum_failures_total"][cpu] == 0
    assert m["lmcached_requests_total"][(("op", "put"),)] == 5
    # Buckets are cumulative and end at +Inf == count.
    put = "lmcached_request_duration_seconds_bucket"
    assert m[put][(("le", "+Inf"), ("op", "put"))] == 5
    assert m[put][(("le", "0.0001"), ("op", "put"))] == 0
    assert m[put][(("le", "0.0005"), ("op", "put"))] == 5
    assert m["lmcached_request_duration_seconds_count"][(("op", "get"),)] == 2
    assert m["lmcached_requests_total"][(("op", "get"),)] == 2
    assert len([k for k in m[put] if ("op", "put") in k]) == len(LATENCY_BUCKETS) + 1
    # Retrieve and lookup ratios are separate.
    assert m["lmcached_retrieve_hit_ratio"][()] == 4 / 6
    assert m["lmcached_lookup_hit_ratio"][()] == 2 / 8
    assert m["lmcached_worker_up"][(("worker", "0"),)] == 1
    assert m["lmcached_healthy"][()] == 1


def test_counters_stay_monotonic_when_a_worker_restarts():
    first = ClusterSnapshot([WorkerSample(0, worker_stats(0, 100, 4, 0), 0.001)], 1, 1.0)
    server = MetricsServer("127.0.0.1", 0, lambda: first)
    fams = server.collector.families(first)
    puts = {f.name: f for f in fams}["lmcached_tier_puts"].samples[0].value
    assert puts == 4
    # Same worker id, new pid, counting from zero again.
    restarted = ClusterSnapshot([WorkerSample(0, worker_stats(0, 200, 1, 0), 0.001)], 1, 1.0)
    fams = server.collector.families(restarted)
    assert {f.name: f for f in fams}["lmcached_tier_puts"].samples[0].value == 4 + 1
    # A worker that misses the deadline keeps its last values and is reported down.
    silent = ClusterSnapshot([WorkerSample(0, None, 1.0, "no answer within 1.0 s")], 1, 1.0)
    fams = {f.name: f for f in server.collector.families(silent)}
    assert fams["lmcached_tier_puts"].samples[0].value == 5
    assert fams["lmcached_worker_up"].samples[0].value == 0
    assert fams["lmcached_healthy"].samples[0].value == 0


def test_hit_ratio_is_unknown_before_any_request():
    snap = ClusterSnapshot([WorkerSample(0, {"pid": 1, "store": {}}, 0.0)], 1, 1.0)
    m = scrape(snap)
    assert math.isnan(m["lmcached_lookup_hit_ratio"][()])
    assert math.isnan(m["lmcached_retrieve_hit_ratio"][()])


def test_plugin_states_and_restarts():
    snap = ClusterSnapshot(
        [WorkerSample(0, {"pid": 1, "store": {}}, 0.0)],
        1,
        1.0,
        scheduler={
            "plugins": [
                {"name": "exporter.py", "role": "scheduler", "state": "BACKOFF", "restarts": 3}
            ]
        },
    )
    m = scrape(snap)
    labels = (
        ("lmcached_plugin_state", "BACKOFF"),
        ("plugin", "exporter.py"),
        ("role", "scheduler"),
        ("worker", ""),
    )
    assert m["lmcached_plugin_state"][labels] == 1
    running = tuple((k, "RUNNING" if k == "lmcached_plugin_state" else v) for k, v in labels)
    assert m["lmcached_plugin_state"][running] == 0
    assert m["lmcached_plugin_restarts_total"][labels[1:]] == 3


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_http_endpoint_serves_metrics_and_healthz():
    state = {"snap": ClusterSnapshot([WorkerSample(0, {"pid": 1, "store": {}}, 0.0)], 2, 1.0)}
    server = MetricsServer("127.0.0.1", 0, lambda: state["snap"])
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, body = get(base + "/healthz")
        assert status == 503
        health = json.loads(body)
        assert health["status"] == "unhealthy"
        assert "worker 1 is not running" in health["problems"]
        state["snap"] = ClusterSnapshot(
            [WorkerSample(0, {"pid": 1}, 0.0), WorkerSample(1, {"pid": 2}, 0.0)], 2, 1.0
        )
        status, body = get(base + "/healthz")
        assert (status, json.loads(body)["status"]) == (200, "ok")
        status, body = get(base + "/metrics")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"lmcached_tier_hits", "lmcached_request_duration_seconds"} <= names
        assert get(base + "/nope")[0] == 404
    finally:
        server.stop()
        server.stop()


def test_namespace_figures_come_from_the_quota_tier():
    from lmcached.storage.namespaces import NamespacedBackend

    cost = entry_cost(b"a/0", 512, None, arena=False)
    tier = NamespacedBackend(4 * cost, {"a": 2 * cost})
    for i in range(3):
        tier.put(b"a/%d" % i, Block.from_bytes(b"x" * 512))
    snap = ClusterSnapshot(
        [WorkerSample(0, {"pid": 1, "store": {"cpu": tier.stats()}}, 0.0)], 1, 1.0
    )
    m = scrape(snap)
    a = (("namespace", "a"),)
    assert m["lmcached_namespace_stored_bytes"][a] == 2 * cost
    assert m["lmcached_namespace_quota_bytes"][a] == 2 * cost
    assert m["lmcached_namespace_evictions_total"][a] == 1
    assert m["lmcached_tier_evictions_total"][(("tier", "cpu"),)] == 1


def test_plugins_reported_in_status_extras_become_metrics(tmp_path):
    from lmcached import config
    from lmcached.daemon.scheduler import PendingStatus, Scheduler
    from lmcached.daemon.sdnotify import Notifier
    from lmcached.daemon.service import Operations

    cfg = config.from_mapping(
        {"runtime_dir": str(tmp_path), "metrics_port": None, "num_workers": 1}, environ={}
    )
    scheduler = Scheduler(cfg)
    try:
        ops = Operations(scheduler, notifier=Notifier(None))
        ops.attach()
        scheduler.status_extras.append(
            lambda: {"plugins": [{"name": "warmup.py", "role": "worker", "worker_id": 0,
                                  "state": "RUNNING", "restarts": 1}]}
        )  # fmt: skip
        pending = PendingStatus(None, 0, time.monotonic(), {})
        snap = ops.snapshot_from(pending)
        ext = {
            "mystore": {"category": "storage_backend", "class": "x:Y", "state": "disabled"},
            "folder": {
                "category": "remote_connector",
                "class": "x:Z",
                "state": "running",
                "metrics": {"root": "/kv", "puts": 3, "ok": True, "io": {"reads": 2}},
            },
        }
        snap.workers.append(WorkerSample(1, {"pid": 9, "extensions": ext}, 0.0))
        assert snap.problems()[:2] == ["scheduler is starting", "worker 0: worker is stopped"]
        m = scrape(snap)
        labels = (("plugin", "warmup.py"), ("role", "worker"), ("worker", "0"))
        assert m["lmcached_plugin_restarts_total"][labels] == 1
        assert m["lmcached_plugin_state"][(("lmcached_plugin_state", "RUNNING"), *labels)] == 1
        ext_labels = (("category", "storage_backend"), ("extension", "mystore"), ("worker", "1"))
        assert (
            m["lmcached_extension_state"][
                (*ext_labels[:2], ("lmcached_extension_state", "disabled"), ext_labels[2])
            ]
            == 1
        )
        values = m["lmcached_extension_value"]
        folder = (("category", "remote_connector"), ("extension", "folder"))
        assert values == {  # numbers only; nested keys dotted; nothing for a disabled one
            (*folder, ("metric", "io.reads"), ("worker", "1")): 2,
            (*folder, ("metric", "puts"), ("worker", "1")): 3,
        }
        ops.stop()
        ops.stop()
    finally:
        scheduler.shutdown()
