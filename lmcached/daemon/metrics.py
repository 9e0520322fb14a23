"""Prometheus metrics and the health endpoint, served by the scheduler on a loopback port.

Each worker reports plain numbers in its ``stats`` reply (tier counters, per-op counts and
latency bucket counts from :mod:`lmcached.daemon.op_latency`). At scrape time the scheduler asks every
worker for ``stats`` within a deadline and a custom collector turns the replies into metric
families. Nothing is shared between processes through files, so no PROMETHEUS_MULTIPROC_DIR
setting can be forgotten and no metric appears or disappears with the environment.

Counters stay monotonic across worker restarts: when a worker's pid changes, the last values
seen from the old process are carried into the sums, and a worker that misses the deadline
contributes its last values (its ``lmcached_worker_up`` says it is down).
"""

from __future__ import annotations

import json
import math
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    StateSetMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from lmcached.daemon.op_latency import LATENCY_BUCKETS
from lmcached.supervision.states import ProcessState
from lmcached.version import __version__

# Supervisor's process states; plugin_state exposes one of them as 1, the rest as 0.
PLUGIN_STATES = tuple(s.value for s in ProcessState)
EXTENSION_STATES = ("running", "disabled", "stopped")

# Tier counter name in a worker's store stats -> (metric name without _total, help).
# Aliases let tiers spell a counter their own way without the metric changing name.
TIER_COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("lmcached_tier_hits", "Reads that found the block in this tier."),
    "misses": ("lmcached_tier_misses", "Reads that did not find the block in this tier."),
    "puts": ("lmcached_tier_puts", "Blocks written into this tier."),
    "bytes_stored": ("lmcached_tier_written_bytes", "Payload bytes written into this tier."),
    "bytes_read": ("lmcached_tier_read_bytes", "Payload bytes read from this tier."),
    "evictions": ("lmcached_tier_evictions", "Blocks evicted from this tier by its budget."),
    "rejected": ("lmcached_tier_rejected", "Writes this tier refused (too large, full)."),
    "errors": ("lmcached_tier_errors", "Failed operations of this tier (I/O, remote down)."),
    "queue_drops": (
        "lmcached_tier_queue_drops",
        "Writes dropped because this tier's asynchronous write queue was full.",
    ),
    "checksum_failures": (
        "lmcached_tier_checksum_failures",
        "Blocks whose checksum did not match on read (deleted, served as a miss).",
    ),
}
TIER_COUNTER_ALIASES = {
    "write_queue_drops": "queue_drops",
    "queue_dropped": "queue_drops",
    "dropped_writes": "queue_drops",
    "checksum_errors": "checksum_failures",
}
# Always exported per tier, at 0 when a tier does not have the notion, so alerts need no
# `or vector(0)`.
ALWAYS_EXPORTED = ("hits", "misses", "evictions", "queue_drops", "checksum_failures")
TIER_GAUGES: dict[str, tuple[str, str]] = {
    "used_bytes": ("lmcached_tier_stored_bytes", "Bytes held by this tier now."),
    "capacity_bytes": ("lmcached_tier_capacity_bytes", "Byte budget of this tier."),
    "entries": ("lmcached_tier_blocks", "Blocks held by this tier now."),
    "up": ("lmcached_tier_up", "1 while a remote tier answers, 0 while it is marked down."),
}


@dataclass
class WorkerSample:
    """One worker's answer to a stats probe, or why there was none."""

    worker_id: int
    stats: Mapping[str, Any] | None
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.stats is not None and self.error is None


@dataclass
class ClusterSnapshot:
    """What the scheduler knows at one instant: every worker's stats plus its own state.

    ``scheduler`` may hold: ``state`` (running, reloading, stopping), ``epoch``,
    ``worker_restarts`` ({worker_id: n}), ``plugins`` (list of {name, role, worker_id, state,
    restarts}), ``auth_refused`` (connections refused at the control endpoint).
    """

    workers: list[WorkerSample]
    expected_workers: int
    deadline: float
    scheduler: Mapping[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Return one sentence per reason the daemon is not healthy (empty when healthy)."""
        out = []
        state = self.scheduler.get("state", "running")
        if state == "unresponsive":
            # The loop did not take the probe: worker figures would be guesses.
            return [f"scheduler loop did not answer within {self.deadline} s"]
        if state != "running":
            out.append(f"scheduler is {state}")
        seen = {w.worker_id for w in self.workers}
        for wid in range(self.expected_workers):
            if wid not in seen:
                out.append(f"worker {wid} is not running")
        for w in sorted(self.workers, key=lambda w: w.worker_id):
            if not w.ok:
                out.append(f"worker {w.worker_id}: {w.error or 'no answer'}")
        return out

    @property
    def healthy(self) -> bool:
        return not self.problems()

    def health(self) -> dict[str, Any]:
        """Return the /healthz JSON body."""
        problems = self.problems()
        return {
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "deadline_seconds": self.deadline,
            "workers": {
                str(w.worker_id): (
                    {"ok": True, "pid": (w.stats or {}).get("pid"), "seconds": round(w.seconds, 6)}
                    if w.ok
                    else {"ok": False, "error": w.error or "no answer"}
                )
                for w in sorted(self.workers, key=lambda w: w.worker_id)
            },
        }


# ---------------------------------------------------------------------------------------------
# Flattening worker stats into counters and gauges.
# ---------------------------------------------------------------------------------------------

SampleKey = tuple[str, tuple[str, ...]]  # (series id, label values)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _numeric_items(values: Any, prefix: str = "", depth: int = 3) -> Iterator[tuple[str, float]]:
    """Yield ``(dotted key, number)`` for every number in a plugin's metrics, sorted by key."""
    if not isinstance(values, Mapping) or depth == 0:
        return
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        name = f"{prefix}{key}"
        number = _number(value)
        if number is not None:
            yield name, number
        elif isinstance(value, Mapping):
            yield from _numeric_items(value, name + ".", depth - 1)


def _tier_items(stats: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    store = stats.get("store")
    if not isinstance(store, Mapping):
        return
    for tier, tier_stats in store.items():
        if isinstance(tier_stats, Mapping):
            yield str(tier), tier_stats


def flatten_worker_stats(
    stats: Mapping[str, Any],
) -> tuple[dict[SampleKey, float], dict[SampleKey, float]]:
    """Split one worker's stats reply into (counters, gauges) keyed by series and labels."""
    counters: dict[SampleKey, float] = {}
    gauges: dict[SampleKey, float] = {}
    for tier, tier_stats in _tier_items(stats):
        for name in ALWAYS_EXPORTED:
            counters[("tier:" + name, (tier,))] = 0.0
        for raw, value in tier_stats.items():
            number = _number(value)
            if number is None:
                continue
            name = TIER_COUNTER_ALIASES.get(raw, raw)
            if name in TIER_COUNTERS:
                counters[("tier:" + name, (tier,))] = number
            elif name in TIER_GAUGES:
                gauges[("tier:" + name, (tier,))] = number

    ops = stats.get("ops")
    if isinstance(ops, Mapping):
        for op, n in dict(ops.get("requests", {})).items():
            counters[("requests", (str(op),))] = float(n)
        for code, n in dict(ops.get("errors", {})).items():
            counters[("request_errors", (str(code),))] = float(n)
        for raw, name in (
            ("lookup_keys", "lookup_keys"),
            ("lookup_hits", "lookup_hits"),
            ("bytes_in", "received_bytes"),
            ("bytes_out", "sent_bytes"),
        ):
            number = _number(ops.get(raw))
            if number is not None:
                counters[(name, ())] = number

    latency = stats.get("latency")
    if isinstance(latency, Mapping):
        if tuple(latency.get("buckets", ())) != LATENCY_BUCKETS:
            # A worker from another version with other bounds: summing would lie.
            latency = {}
        for op, hist in dict(latency.get("latency", {})).items():
            counts = list(hist.get("counts", ()))
            if len(counts) != len(LATENCY_BUCKETS) + 1:
                continue
            for i, c in enumerate(counts):
                counters[(f"hist:{i}", (str(op),))] = float(c)
            counters[("hist:sum", (str(op),))] = float(hist.get("sum", 0.0))
        for name in ("retrieve_keys", "retrieve_hits"):
            number = _number(latency.get(name))
            if number is not None:
                counters[(name, ())] = number

    auth = stats.get("auth")
    if isinstance(auth, Mapping) and _number(auth.get("refused")) is not None:
        counters[("auth_refused", ("data",))] = float(auth["refused"])

    # Namespace figures come from the quota'd CPU tier (storage.namespaces) or the top level.
    namespaces: dict[str, Any] = {}
    for _, tier_stats in _tier_items(stats):
        if isinstance(tier_stats.get("namespaces"), Mapping):
            namespaces.update(tier_stats["namespaces"])
    if isinstance(stats.get("namespaces"), Mapping):
        namespaces.update(stats["namespaces"])
    if namespaces:
        for ns, ns_stats in namespaces.items():
            if not isinstance(ns_stats, Mapping):
                continue
            for raw, key, table in (
                ("used_bytes", "ns:used_bytes", gauges),
                ("quota_bytes", "ns:quota_bytes", gauges),
                ("entries", "ns:entries", gauges),
                ("evictions", "ns:evictions", counters),
                ("rejected", "ns:rejected", counters),
            ):
                number = _number(ns_stats.get(raw))
                if number is not None:
                    table[(key, (str(ns),))] = number
    return counters, gauges


def _add(into: dict[SampleKey, float], values: Mapping[SampleKey, float]) -> None:
    for k, v in values.items():
        into[k] = into.get(k, 0.0) + v


@dataclass
class _WorkerMemory:
    pid: Any = None
    counters: dict[SampleKey, float] = field(default_factory=dict)
    gauges: dict[SampleKey, float] = field(default_factory=dict)
    carried: dict[SampleKey, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The collector.
# ---------------------------------------------------------------------------------------------


class ClusterCollector(Collector):
    """Turn a :class:`ClusterSnapshot` (taken at scrape time) into Prometheus metric families."""

    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self._snapshot = snapshot
        self._memory: dict[int, _WorkerMemory] = {}
        self._lock = threading.Lock()

    def collect(self) -> Iterable[Metric]:
        return self.families(self._snapshot())

    def families(self, snap: ClusterSnapshot) -> list[Metric]:
        """Build every metric family from one snapshot."""
        with self._lock:
            counters, gauges = self._merge(snap)
        out: list[Metric] = []
        out.extend(self._tier_families(counters, gauges))
        out.extend(self._request_families(counters))
        out.extend(self._worker_families(snap))
        out.extend(self._plugin_families(snap))
        out.extend(self._stat_logger_families(snap))
        out.extend(self._namespace_families(counters, gauges))

        refused = CounterMetricFamily(
            "lmcached_auth_refused",
            "Connections refused for missing or unauthorised credentials.",
            labels=["endpoint"],
        )
        refused.add_metric(["data"], counters.get(("auth_refused", ("data",)), 0.0))
        refused.add_metric(["control"], float(snap.scheduler.get("auth_refused", 0)))
        out.append(refused)

        healthy = GaugeMetricFamily(
            "lmcached_healthy", "1 when every worker answered its probe in time (as /healthz)."
        )
        healthy.add_metric([], 1.0 if snap.healthy else 0.0)
        out.append(healthy)
        epoch = _number(snap.scheduler.get("epoch"))
        if epoch is not None:
            out.append(GaugeMetricFamily("lmcached_map_epoch", "Cluster map epoch.", value=epoch))
        info = GaugeMetricFamily(
            "lmcached_build_info", "Version of the daemon.", labels=["version"]
        )
        info.add_metric([__version__], 1.0)
        out.append(info)
        return out

    def _merge(
        self, snap: ClusterSnapshot
    ) -> tuple[dict[SampleKey, float], dict[SampleKey, float]]:
        """Sum workers' counters (carrying dead incarnations' values) and gauges."""
        for w in snap.workers:
            if not w.ok or w.stats is None:
                continue
            mem = self._memory.setdefault(w.worker_id, _WorkerMemory())
            pid = w.stats.get("pid")
            if mem.pid is not None and pid != mem.pid:
                # A restarted worker starts from zero; keep what the old one had counted.
                _add(mem.carried, mem.counters)
            mem.pid = pid
            mem.counters, mem.gauges = flatten_worker_stats(w.stats)
        counters: dict[SampleKey, float] = {}
        gauges: dict[SampleKey, float] = {}
        for mem in self._memory.values():
            _add(counters, mem.carried)
            _add(counters, mem.counters)
            _add(gauges, mem.gauges)
        return counters, gauges

    @staticmethod
    def _tier_families(
        counters: Mapping[SampleKey, float], gauges: Mapping[SampleKey, float]
    ) -> Iterator[Metric]:
        for name, (metric, doc) in TIER_COUNTERS.items():
            fam = CounterMetricFamily(metric, doc, labels=["tier"])
            for (series, labels), value in sorted(counters.items()):
                if series == "tier:" + name:
                    fam.add_metric(list(labels), value)
            yield fam
        for name, (metric, doc) in TIER_GAUGES.items():
            fam_g = GaugeMetricFamily(metric, doc, labels=["tier"])
            for (series, labels), value in sorted(gauges.items()):
                if series == "tier:" + name:
                    fam_g.add_metric(list(labels), value)
            yield fam_g

    @staticmethod
    def _request_families(counters: Mapping[SampleKey, float]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "lmcached_requests", "Requests served by the workers, by op.", labels=["op"]
        )
        errors = CounterMetricFamily(
            "lmcached_request_errors",
            "Requests answered with an error, by error code.",
            labels=["code"],
        )
        for (series, labels), value in sorted(counters.items()):
            if series == "requests":
                requests.add_metric(list(labels), value)
            elif series == "request_errors":
                errors.add_metric(list(labels), value)
        yield requests
        yield errors
        for name, doc in (
            ("received_bytes", "Payload bytes received by put requests."),
            ("sent_bytes", "Payload bytes sent in get replies."),
        ):
            yield CounterMetricFamily(f"lmcached_{name}", doc, value=counters.get((name, ()), 0.0))

        hist = HistogramMetricFamily(
            "lmcached_request_duration_seconds",
            "Time a worker spent on a request, from receipt to reply, by op.",
            labels=["op"],
        )
        ops = sorted({labels[0] for (series, labels) in counters if series == "hist:sum"})
        bounds = [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
        for op in ops:
            cumulative = 0.0
            buckets = []
            for i, bound in enumerate(bounds):
                cumulative += counters.get((f"hist:{i}", (op,)), 0.0)
                buckets.append((bound, cumulative))
            hist.add_metric([op], buckets, counters.get(("hist:sum", (op,)), 0.0))
        yield hist

        for kind, doc in (
            ("lookup", "Keys asked by lookup/exists"),
            ("retrieve", "Keys asked by get"),
        ):
            asked = counters.get((f"{kind}_keys", ()), 0.0)
            hits = counters.get((f"{kind}_hits", ()), 0.0)
            yield CounterMetricFamily(f"lmcached_{kind}_keys", f"{doc}.", value=asked)
            yield CounterMetricFamily(
                f"lmcached_{kind}_hit_keys", f"{doc} that were found.", value=hits
            )
            # NaN before the first key: a ratio of nothing is unknown, not 1.0.
            ratio = hits / asked if asked else math.nan
            yield GaugeMetricFamily(
                f"lmcached_{kind}_hit_ratio",
                f"{doc} that were found, since start (for windows use rate() of the counters).",
                value=ratio,
            )

    @staticmethod
    def _worker_families(snap: ClusterSnapshot) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "lmcached_worker_up", "1 when the worker answered its probe in time.", labels=["worker"]
        )
        probe = GaugeMetricFamily(
            "lmcached_worker_probe_seconds",
            "Round trip of the last stats probe to the worker.",
            labels=["worker"],
        )
        for w in sorted(snap.workers, key=lambda w: w.worker_id):
            up.add_metric([str(w.worker_id)], 1.0 if w.ok else 0.0)
            probe.add_metric([str(w.worker_id)], w.seconds)
        yield up
        yield probe
        restarts = CounterMetricFamily(
            "lmcached_worker_restarts",
            "Times the scheduler restarted a worker after it exited.",
            labels=["worker"],
        )
        for wid, n in sorted(dict(snap.scheduler.get("worker_restarts", {})).items()):
            restarts.add_metric([str(wid)], float(n))
        yield restarts

    @staticmethod
    def _plugin_families(snap: ClusterSnapshot) -> Iterator[Metric]:
        # Script plugins (lmcached.supervision.launcher snapshots): the scheduler's own, then each
        # worker's; role and worker default to where the list came from.
        plugins: list[tuple[Any, str, int | None]] = [
            (p, "scheduler", None) for p in snap.scheduler.get("plugins", []) or []
        ]
        for w in snap.workers:
            if w.stats is not None and isinstance(w.stats.get("plugins"), list):
                plugins.extend((p, "worker", w.worker_id) for p in w.stats["plugins"])
        labels = ["plugin", "role", "worker"]
        state = StateSetMetricFamily(
            "lmcached_plugin_state", "Supervision state of each script plugin.", labels=labels
        )
        restarts = CounterMetricFamily(
            "lmcached_plugin_restarts", "Times a script plugin was restarted.", labels=labels
        )
        for p, role, worker_id in plugins:
            if not isinstance(p, Mapping) or "name" not in p:
                continue
            wid = p.get("worker_id", worker_id)
            values = [str(p["name"]), str(p.get("role", role)), "" if wid is None else str(wid)]
            current = str(p.get("state", "")).upper()
            state.add_metric(values, {s: s == current for s in PLUGIN_STATES})
            restarts.add_metric(values, float(p.get("restarts", 0)))
        yield state
        yield restarts

        # In-process extensions (lmcached.extensions.startup.extension_states) per worker.
        ext = StateSetMetricFamily(
            "lmcached_extension_state",
            "State of each in-process extension (external backend, connector) per worker.",
            labels=["extension", "category", "worker"],
        )
        # Their get_metrics() numbers, under the plugin's name. Gauges: lmcached cannot tell a
        # plugin's counters from its levels, and per-worker values need no restart carrying.
        ext_values = GaugeMetricFamily(
            "lmcached_extension_value",
            "Numbers a running in-process extension reports from get_metrics(), per worker "
            "(nested keys joined with '.').",
            labels=["extension", "category", "worker", "metric"],
        )
        for w in sorted(snap.workers, key=lambda w: w.worker_id):
            extensions = (w.stats or {}).get("extensions")
            if not isinstance(extensions, Mapping):
                continue
            for name, info in sorted(extensions.items()):
                if not isinstance(info, Mapping):
                    continue
                current = str(info.get("state", ""))
                values = [str(name), str(info.get("category", "")), str(w.worker_id)]
                ext.add_metric(values, {s: s == current for s in EXTENSION_STATES})
                for metric, number in _numeric_items(info.get("metrics")):
                    ext_values.add_metric([*values, metric], number)
        yield ext
        yield ext_values

    @staticmethod
    def _stat_logger_families(snap: ClusterSnapshot) -> Iterator[Metric]:
        # The scheduler's stat loggers (lmcached.daemon.stat_loggers): counted per logger.
        loggers = snap.scheduler.get("stat_loggers") or {}
        families = {
            key: CounterMetricFamily(name, text, labels=["logger"])
            for key, name, text in (
                ("records", "lmcached_stat_logger_records", "Snapshots a stat logger recorded."),
                ("errors", "lmcached_stat_logger_errors", "Snapshots a stat logger raised on."),
                (
                    "dropped",
                    "lmcached_stat_logger_dropped",
                    "Snapshots replaced by a newer one while a stat logger was still busy.",
                ),
            )
        }
        for name, info in sorted(loggers.items()):
            if isinstance(info, Mapping):
                for key, family in families.items():
                    family.add_metric([str(name)], float(info.get(key, 0) or 0))
        yield from families.values()
        # General plugins: 1 when one failed to run in a process (scheduler or a worker).
        failed = GaugeMetricFamily(
            "lmcached_general_plugin_failed",
            "1 when a general plugin failed to run in that daemon process.",
            labels=["plugin", "role", "worker"],
        )
        runs: list[tuple[str, str, Any]] = [
            ("scheduler", "", snap.scheduler.get("general_plugins"))
        ]
        for w in snap.workers:
            runs.append(("worker", str(w.worker_id), (w.stats or {}).get("general_plugins")))
        for role, worker, states in runs:
            if not isinstance(states, Mapping):
                continue
            for name, info in sorted(states.items()):
                if isinstance(info, Mapping):
                    value = 0.0 if info.get("state") == "ok" else 1.0
                    failed.add_metric([str(name), role, worker], value)
        yield failed

    @staticmethod
    def _namespace_families(
        counters: Mapping[SampleKey, float], gauges: Mapping[SampleKey, float]
    ) -> Iterator[Metric]:
        table = (
            ("ns:used_bytes", gauges, GaugeMetricFamily, "lmcached_namespace_stored_bytes",
             "Bytes a namespace holds in the CPU tier."),
            ("ns:quota_bytes", gauges, GaugeMetricFamily, "lmcached_namespace_quota_bytes",
             "A namespace's CPU-tier quota (summed over workers)."),
            ("ns:entries", gauges, GaugeMetricFamily, "lmcached_namespace_blocks",
             "Blocks a namespace holds in the CPU tier."),
            ("ns:evictions", counters, CounterMetricFamily, "lmcached_namespace_evictions",
             "Blocks evicted to keep a namespace within its quota."),
            ("ns:rejected", counters, CounterMetricFamily, "lmcached_namespace_rejected",
             "Blocks refused because they alone exceed the namespace's quota."),
        )  # fmt: skip
        for series, source, kind, metric, doc in table:
            fam = kind(metric, doc, labels=["namespace"])
            for (s, labels), value in sorted(source.items()):
                if s == series:
                    fam.add_metric(list(labels), value)
            yield fam


# ---------------------------------------------------------------------------------------------
# The HTTP endpoint.
# ---------------------------------------------------------------------------------------------


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: scrapes every few seconds would flood the log."""


class MetricsServer:
    """Serve /metrics (Prometheus text format) and /healthz (JSON) on one HTTP port.

    ``snapshot`` probes the workers; it is called once per request, so /healthz always tells
    the truth of now rather than of the last scrape.
    """

    def __init__(self, host: str, port: int, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self.host = host
        self.requested_port = port
        self._snapshot = snapshot
        self.collector = ClusterCollector(snapshot)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self._server: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve from a daemon thread; raise OSError when the port is taken."""
        if self._server is not None:
            return
        self._server = make_server(
            self.host,
            self.requested_port,
            self._app,
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        try:
            if path == "/healthz":
                snap = self._snapshot()
                body = json.dumps(snap.health()).encode()
                status = "200 OK" if snap.healthy else "503 Service Unavailable"
                start_response(status, [("Content-Type", "application/json")])
                return [body]
            if path in ("/metrics", "/"):
                output = generate_latest(self.registry)
                start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
                return [output]
        except Exception as exc:  # a scrape must never take the scheduler down
            problem = json.dumps({"status": "error", "problems": [f"{type(exc).__name__}: {exc}"]})
            start_response("500 Internal Server Error", [("Content-Type", "application/json")])
            return [problem.encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]
