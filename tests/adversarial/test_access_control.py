"""A local user outside the daemon's trust boundary (the runtime folder's owner and socket_group)
tries to put, purge and shut the daemon down, with a hand-written ZMTP client, as user nobody."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from lmcached import protocol
from lmcached.errors import LMCachedRequestError, LMCachedUnavailable
from lmcached.protocol import PurgeRequest, PutRequest, ShutdownRequest

# Runs as nobody under the system interpreter, standard library only: a ZMTP 3.0 peer with the
# NULL mechanism (what an unauthenticated libzmq DEALER speaks), enough to send one request.
ATTACKER = r"""
import json, socket, struct, sys

def frame(data, more=False, command=False):
    flags = (1 if more else 0) | (4 if command else 0)
    if len(data) > 255:
        return bytes([flags | 2]) + struct.pack(">Q", len(data)) + data
    return bytes([flags, len(data)]) + data

def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed by the daemon")
        out += chunk
    return out

def read_frame(sock):
    flags = read_exact(sock, 1)[0]
    size = struct.unpack(">Q", read_exact(sock, 8))[0] if flags & 2 else read_exact(sock, 1)[0]
    return flags, read_exact(sock, size)

def attack(address, frames):
    family, target = (socket.AF_UNIX, address[6:]) if address.startswith("ipc://") else (
        socket.AF_INET, (address[6:].rsplit(":", 1)[0], int(address.rsplit(":", 1)[1])))
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(3)
    try:
        sock.connect(target)
        greeting = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0")
        sock.sendall(greeting + b"\0" + b"\0" * 31)
        read_exact(sock, 64)
        ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        sock.sendall(frame(ready, command=True))
        while read_frame(sock)[0] & 4 == 0:
            pass
        for i, data in enumerate(frames):
            sock.sendall(frame(data, more=i < len(frames) - 1))
        while True:
            flags, _ = read_frame(sock)
            if not flags & 4:
                return "answered"
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        sock.close()

plan = json.loads(sys.argv[1])
print(json.dumps({f"{t} {op}": attack(t, [bytes.fromhex(f) for f in frames])
                  for t, op, frames in plan}))
"""


def _listening(pids: list[int]) -> list[str]:
    """Every TCP address a daemon process listens on, as tcp:// endpoints."""
    out = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                out.append(f"tcp://{c.laddr.ip}:{c.laddr.port}")
    return out


def _as_nobody() -> Any:
    nobody = pwd.getpwnam("nobody")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    return drop


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as user nobody")
@pytest.mark.skipif(
    not os.access("/usr/bin/python3", os.X_OK), reason="the attacker runs under /usr/bin/python3"
)
def test_any_local_user_cannot_put_purge_or_shut_down_the_daemon(daemon_factory: Any) -> None:
    d = daemon_factory()
    keys = [f"victim/{i}".encode() for i in range(50)]
    with d.client(timeout=20) as c:
        c.put(keys, [b"owner's bytes %d" % i for i in range(50)])
    runtime = Path(d.ipc_endpoint[len("ipc://") :]).parent
    ipc = sorted(f"ipc://{p}" for p in runtime.glob("*.sock"))
    targets = ipc + _listening(d.all_pids())
    assert len(targets) >= 3  # control + 2 workers, at least over ipc
    purge = protocol.encode_request(PurgeRequest(prefix=b"", id=1))
    put = protocol.encode_request(PutRequest(keys=[keys[0]], sizes=[6], blocks=[[b"forged"]], id=2))
    shutdown = protocol.encode_request(ShutdownRequest(id=3))
    plan = []
    for t in targets:
        plan += [
            (t, "purge", [purge.hex()]),
            (t, "put", [put.hex(), b"forged".hex()]),
            (t, "shutdown", [shutdown.hex()]),
        ]
    out = subprocess.run(
        ["/usr/bin/python3", "-c", ATTACKER, json.dumps(plan)],
        preexec_fn=_as_nobody(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    answered = [t for t, r in results.items() if r == "answered"]
    assert answered == [], f"the daemon served a foreign user: {answered}"
    # No effect either: the daemon serves, and every block is the owner's.
    assert d.proc is not None and d.proc.poll() is None
    with d.client(timeout=20) as c:
        assert c.get(keys) == [b"owner's bytes %d" % i for i in range(50)]


def test_tcp_is_off_by_default_and_curve_when_enabled(daemon_factory: Any) -> None:
    d = daemon_factory()
    # Only the read-only metrics endpoint listens on TCP.
    metrics = _metrics_port(d)
    assert [t for t in _listening(d.all_pids()) if not t.endswith(f":{metrics}")] == []
    with pytest.raises(RuntimeError, match="enable_tcp"):
        _ = d.tcp_endpoint

    t = daemon_factory(enable_tcp=True)
    secret = Path(t.cfg.instance_dir) / "curve" / "daemon.key_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o640"
    from lmcached.client import Client

    # Without keys, TCP does not answer; with the daemon's generated pair (readable here, inside
    # the boundary) it does, and so does the config-based client, which finds the pair itself.
    with Client(t.tcp_endpoint, timeout=1.0) as c, pytest.raises(LMCachedUnavailable):
        c.ping()
    with t.client(timeout=20) as c:
        c.put([b"tcp/k"], [b"v"])
    with Client(t.ipc_endpoint, timeout=20) as c:
        assert c.get([b"tcp/k"]) == [b"v"]
    with Client(t.ipc_endpoint, timeout=20, transport="tcp") as c:  # workers over TCP + CURVE
        assert c.get([b"tcp/k"]) == [b"v"]


def _metrics_port(d: Any) -> int:
    from lmcached import runtime

    data = runtime.read_endpoints(d.cfg) or {}
    return int(str(data.get("metrics", "http://x:0")).rsplit(":", 1)[1])


def test_bad_endpoints_give_one_line_errors_and_close_never_hangs() -> None:
    from lmcached.client import Client

    for bad in ("127.0.0.1:7470", "redis://x", ""):
        with pytest.raises(LMCachedRequestError, match="not an lmcached endpoint"):
            Client(bad)
    # A well-formed scheme whose connect fails at once: an error, then close() returns.
    c = Client("tcp://no host here:1", timeout=2.0)
    with pytest.raises((LMCachedRequestError, LMCachedUnavailable)):
        c.ping()
    c.close()


def test_status_without_a_scheme_is_a_one_line_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lmcached", "status", "--endpoint", "127.0.0.1:7470"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an lmcached endpoint" in lines[0], out.stderr


def test_a_non_loopback_metrics_host_is_refused() -> None:
    from lmcached import config
    from lmcached.errors import ConfigError

    with pytest.raises(ConfigError, match="metrics_host"):
        config.from_mapping({"metrics_host": "0.0.0.0"}, environ={})
    # Without a metrics endpoint the host does not matter.
    config.from_mapping({"metrics_host": "0.0.0.0", "metrics_port": None}, environ={})
