"""CURVE on a real daemon, keys from `lmcached keygen`; namespace quotas through the client."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmcached.errors import LMCachedUnavailable
from lmcached.security import ClientCurve
from lmcached.testing import wait_until

from .test_daemon_operations import scrape


def keygen(directory, name: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcached", "keygen", str(directory), name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


@pytest.fixture
def curve_keys(tmp_path):
    keys = tmp_path / "keys"
    keygen(keys, "server")
    keygen(keys / "clients", "engine")
    keygen(keys / "strangers", "stranger")
    allowed = keys / "authorized"
    allowed.mkdir()
    (allowed / "engine.key").write_bytes((keys / "clients" / "engine.key").read_bytes())
    return keys


def test_curve_admits_authorised_clients_and_counts_refusals(daemon_factory, curve_keys):
    d = daemon_factory(
        enable_tcp=True,
        curve_secret_key_file=str(curve_keys / "server.key_secret"),
        curve_authorized_keys=str(curve_keys / "authorized"),
    )
    server_key = str(curve_keys / "server.key")
    engine = ClientCurve.load(str(curve_keys / "clients" / "engine.key_secret"), server_key)
    with d.client(curve=engine, timeout=10) as c:
        c.put([b"secure/k"], [b"payload"])
        assert c.get([b"secure/k"]) == [b"payload"]

    stranger = ClientCurve.load(str(curve_keys / "strangers" / "stranger.key_secret"), server_key)
    from lmcached.client import Client

    for curve in (stranger, None):
        with (
            Client(d.endpoint, timeout=1.0, curve=curve) as c,
            pytest.raises(LMCachedUnavailable),
        ):
            c.ping()

    def refused() -> float:
        return scrape(d)["lmcached_auth_refused_total"][(("endpoint", "control"),)]

    wait_until(lambda: refused() >= 2, 20, what="both refusals to be counted")

    # A keyless peer at a worker's data endpoint is refused and counted there.
    import zmq

    with d.client(curve=engine, timeout=10) as c:
        data_endpoint = c.cluster_map["workers"][0]["tcp"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(data_endpoint)
    sock.send(b"hello?")
    try:
        wait_until(
            lambda: scrape(d)["lmcached_auth_refused_total"][(("endpoint", "data"),)] >= 1,
            20,
            what="the data endpoint refusal to be counted",
        )
    finally:
        sock.close()
        ctx.term()

    # The admin CLI on the daemon's host authenticates with the daemon's own key pair.
    out = subprocess.run(
        [sys.executable, "-m", "lmcached", "status", "--config", str(d.config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"problems": []' in out.stdout

    # No key material reaches the logs.
    d.stop()
    log = d.log()
    for secret_file in (
        curve_keys / "server.key_secret",
        curve_keys / "clients" / "engine.key_secret",
    ):
        secret = ClientCurve.load(str(secret_file), server_key).secret.decode()
        assert secret not in log


def test_loopback_default_needs_no_keys(daemon_factory):
    d = daemon_factory()
    with d.client() as c:
        c.put([b"k"], [b"v"])
        assert c.get([b"k"]) == [b"v"]
    assert scrape(d)["lmcached_auth_refused_total"][(("endpoint", "control"),)] == 0


def test_tenant_a_cannot_evict_tenant_b_within_its_quota(daemon_factory):
    d = daemon_factory(
        num_workers=2,
        max_local_cpu_size="2MiB",
        namespace_quotas={"tenant-a": "512KiB", "tenant-b": "512KiB"},
    )
    block = b"\x07" * (16 << 10)
    b_keys = [b"tenant-b/m@0/any/%04d" % i for i in range(8)]  # 128 KiB: within any split
    a_keys = [b"tenant-a/m@0/any/%04d" % i for i in range(200)]  # 3.2 MiB: far over
    with d.client() as c:
        c.put(b_keys, [block] * len(b_keys))
        for i in range(0, len(a_keys), 20):
            c.put(a_keys[i : i + 20], [block] * 20)
        assert c.exists(b_keys) == [True] * len(b_keys)
        a_kept = sum(c.exists(a_keys))
        # Each worker holds at most its share of tenant-a's quota (512 KiB / 2 workers).
        assert 0 < a_kept <= 2 * ((512 << 10) // 2) // len(block)
    m = scrape(d)
    assert m["lmcached_namespace_evictions_total"][(("namespace", "tenant-a"),)] > 0
    assert m["lmcached_namespace_evictions_total"][(("namespace", "tenant-b"),)] == 0
    assert m["lmcached_namespace_quota_bytes"][(("namespace", "tenant-b"),)] == 512 << 10


def _foreign_group() -> str | None:
    """A group we may chown to that is not our primary one (root: any; else a supplementary)."""
    import grp
    import os

    candidates = (
        [g.gr_name for g in grp.getgrall()]
        if os.geteuid() == 0
        else [grp.getgrgid(g).gr_name for g in os.getgroups()]
    )
    primary = grp.getgrgid(os.getegid()).gr_name
    return next((g for g in candidates if g != primary), None)


def test_sockets_and_runtime_files_belong_to_socket_group(daemon_factory):
    import grp
    import os
    import stat

    group = _foreign_group()
    if group is None:
        pytest.skip("no second group to hand the sockets to")
    d = daemon_factory(socket_group=group)
    gid = grp.getgrnam(group).gr_gid
    folder = d.cfg.instance_dir
    sockets = [f for f in os.listdir(folder) if f.endswith(".sock") and f != "internal.sock"]
    assert {"control.sock", "worker-0.sock", "worker-1.sock"} <= set(sockets)
    for name in sockets:
        st = os.stat(os.path.join(folder, name))
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660), name
    st = os.stat(folder)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o750)
    st = os.stat(os.path.join(folder, "endpoints.json"))
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o640)
