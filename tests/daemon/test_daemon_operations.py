"""A real daemon under a fake service manager: sd_notify sequence, /metrics, /healthz.

SIGSTOP wedges a worker (it stays alive but answers nothing): /healthz must flip to 503 and the
watchdog pings must stop; after SIGCONT both come back.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmcached import runtime
from lmcached.storage.cpu import entry_cost
from lmcached.testing import wait_until

from .notify_socket import FakeNotifySocket

FAST_HEALTH = {"health_interval": 0.2, "health_deadline": 0.5}


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def metrics_url(daemon) -> str:
    data = runtime.read_endpoints(daemon.cfg)
    assert data and data.get("metrics"), data
    return str(data["metrics"])


def scrape(daemon) -> dict[str, dict[tuple, float]]:
    status, body = http_get(metrics_url(daemon) + "/metrics")
    assert status == 200
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def notify(tmp_path):
    sock = FakeNotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def test_notify_sequence_and_watchdog_stops_while_a_worker_is_wedged(daemon_factory, notify):
    d = daemon_factory(
        start=False,
        env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"},
        **FAST_HEALTH,
    )
    d.start()
    ready = notify.wait_for("READY")
    assert ready["STATUS"] == "2/2 workers serving"
    # READY is the first thing we say; watchdog pings follow passing health checks.
    assert "READY" in notify.messages[0]
    notify.wait_for("WATCHDOG", since=len(notify.messages))

    victim = d.worker_pids()[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        notify.wait_for_match(
            lambda m: "UNHEALTHY" in m.get("STATUS", ""), since=len(notify.messages)
        )
        # Drain what was in flight, then no WATCHDOG=1 may arrive while the worker is stopped:
        # wait over several health-check periods (the pings would come every 0.2 s).
        notify.poll(0.5)
        mark = len(notify.messages)
        waited = time.monotonic() + 2.0
        while time.monotonic() < waited:
            notify.poll(0.2)
        assert not any("WATCHDOG" in m for m in notify.messages[mark:]), notify.messages[mark:]
    finally:
        os.kill(victim, signal.SIGCONT)
    notify.wait_for("WATCHDOG", since=len(notify.messages))

    # SIGHUP: RELOADING=1 with a timestamp, then READY=1 again.
    mark = len(notify.messages)
    os.kill(d.pid, signal.SIGHUP)
    at, reloading = notify.wait_for_match(lambda m: "RELOADING" in m, since=mark)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    notify.wait_for("READY", since=at + 1)

    mark = len(notify.messages)
    assert d.stop() == 0
    notify.wait_for("STOPPING", since=mark)


def test_workers_do_not_inherit_notify_socket(daemon_factory, notify):
    d = daemon_factory(start=False, env={"NOTIFY_SOCKET": notify.address})
    d.start()
    notify.wait_for("READY")
    for pid in d.worker_pids():
        with open(f"/proc/{pid}/environ", "rb") as f:
            assert b"NOTIFY_SOCKET=" not in f.read()


def test_metrics_scrape_parses_and_counters_move_after_traffic(daemon_factory):
    d = daemon_factory()
    before = scrape(d)
    cpu = (("tier", "cpu"),)
    assert before["lmcached_tier_hits_total"][cpu] == 0
    assert before["lmcached_worker_up"][(("worker", "0"),)] == 1
    with d.client() as c:
        keys = [b"tenant/m@0/any/%04d" % i for i in range(8)]
        c.put(keys, [b"v" * 4096] * 8)
        assert all(v is not None for v in c.get(keys))
        assert c.get([b"tenant/m@0/any/missing"]) == [None]
        assert c.lookup(keys) == 8
        c.flush()  # answered from the worker's I/O pool: timed until its reply
    after = scrape(d)
    assert after["lmcached_tier_hits_total"][cpu] >= 8
    assert after["lmcached_tier_misses_total"][cpu] >= 1
    # Each entry is charged its slot, key, meta and a fixed overhead (docs/same-host.md).
    assert after["lmcached_tier_stored_bytes"][cpu] == sum(
        entry_cost(k, 4096, None, arena=True) for k in keys
    )
    assert after["lmcached_requests_total"][(("op", "put"),)] >= 1
    put_count = after["lmcached_request_duration_seconds_count"][(("op", "put"),)]
    assert put_count == after["lmcached_requests_total"][(("op", "put"),)]
    flush = (("op", "flush"),)
    assert after["lmcached_requests_total"][flush] == 2  # one per worker
    assert after["lmcached_request_duration_seconds_count"][flush] == 2
    assert after["lmcached_retrieve_hit_keys_total"][()] == 8
    assert after["lmcached_retrieve_keys_total"][()] == 9
    assert after["lmcached_retrieve_hit_ratio"][()] == pytest.approx(8 / 9)
    assert after["lmcached_lookup_hit_ratio"][()] == 1.0
    assert after["lmcached_received_bytes_total"][()] == 8 * 4096


def test_healthz_flips_to_503_under_sigstop_and_back_after_sigcont(daemon_factory):
    d = daemon_factory(**FAST_HEALTH)
    url = metrics_url(d) + "/healthz"
    status, body = http_get(url)
    assert status == 200, body
    assert json.loads(body)["status"] == "ok"
    victim = d.worker_pids()[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        status, body = http_get(url)
        assert status == 503
        health = json.loads(body)
        assert health["status"] == "unhealthy"
        wedged = [w for w, info in health["workers"].items() if not info["ok"]]
        assert len(wedged) == 1 and "no answer within" in health["workers"][wedged[0]]["error"]
        assert scrape(d)["lmcached_healthy"][()] == 0
        # `lmcached status` tells the same truth.
        with d.client() as c:
            from lmcached.daemon.service import health_of_status

            problems = health_of_status(c.stats())
        assert len(problems) == 1 and problems[0].startswith(f"worker {wedged[0]}")
    finally:
        os.kill(victim, signal.SIGCONT)
    status, body = wait_until(
        lambda: (r := http_get(url))[0] == 200 and r, 20, what="/healthz back to 200"
    )
    assert json.loads(body)["status"] == "ok"


def test_script_plugin_states_are_exported(daemon_factory, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    tmp_path.chmod(0o755)
    plugins.chmod(0o755)
    for name in ("scheduler_idle.sh", "worker_0_idle.sh"):
        (plugins / name).write_text("sleep 1000\n")
    d = daemon_factory(plugin_locations=[str(plugins)], plugin_stop_timeout=1.0)
    state = "lmcached_plugin_state"

    def running() -> dict[tuple, float]:
        m = scrape(d)[state]
        return {k: v for k, v in m.items() if (state, "RUNNING") in k and v == 1}

    found = wait_until(lambda: len(running()) == 2 and running(), 20, what="plugins RUNNING")
    labels = {tuple(kv for kv in k if kv[0] != state) for k in found}
    assert labels == {
        (("plugin", "scheduler_idle.sh"), ("role", "scheduler"), ("worker", "")),
        (("plugin", "worker_0_idle.sh"), ("role", "worker"), ("worker", "0")),
    }
    restarts = scrape(d)["lmcached_plugin_restarts_total"]
    assert restarts[(("plugin", "worker_0_idle.sh"), ("role", "worker"), ("worker", "0"))] == 0
