"""CURVE keys, the ZAP allow-list and refusal counting, on real ZMQ sockets."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
import zmq
import zmq.auth

from lmcached import config
from lmcached.errors import ConfigError
from lmcached.security import (
    AuthGuard,
    ClientCurve,
    ServerCurve,
    keygen,
    restrict_to_group,
)


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def keys(tmp_path):
    server_pub, server_sec = keygen(tmp_path / "server", "server")
    allowed = tmp_path / "authorized"
    good_pub, good_sec = keygen(tmp_path / "clients", "good")
    _, bad_sec = keygen(tmp_path / "clients", "bad")
    allowed.mkdir()
    (allowed / "good.key").write_bytes(good_pub.read_bytes())
    return {
        "server_pub": str(server_pub),
        "server_sec": str(server_sec),
        "allowed": str(allowed),
        "good_sec": str(good_sec),
        "bad_sec": str(bad_sec),
    }


def test_keygen_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    public, secret = keygen(tmp_path / "k", "server")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert b"secret-key" in secret.read_bytes()
    assert b"secret-key" not in public.read_bytes()
    with pytest.raises(FileExistsError):
        keygen(tmp_path / "k", "server")
    keygen(tmp_path / "k", "server", force=True)


def request(ctx, endpoint: str, curve: ClientCurve | None, timeout_ms: int = 3000) -> bytes | None:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    try:
        sock.send(b"ping")
        if sock.poll(timeout_ms):
            return sock.recv()
        return None
    finally:
        sock.close()


def test_authorised_client_is_served_and_others_are_refused_and_counted(keys):
    cfg = config.from_mapping(
        {"curve_secret_key_file": keys["server_sec"], "curve_authorized_keys": keys["allowed"]},
        environ={},
    )
    ctx = zmq.Context()
    guard = AuthGuard(ctx, ServerCurve.from_config(cfg))
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    guard.secure(server)
    endpoint = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    stop = False

    def echo():
        while not stop:
            if server.poll(50):
                ident, msg = server.recv_multipart()
                server.send_multipart([ident, b"pong:" + msg])

    t = threading.Thread(target=echo)
    t.start()
    try:
        good = ClientCurve.load(keys["good_sec"], keys["server_pub"], environ={})
        assert request(ctx, endpoint, good) == b"pong:ping"
        assert guard.refused == 0

        bad = ClientCurve.load(keys["bad_sec"], keys["server_pub"], environ={})
        assert request(ctx, endpoint, bad, timeout_ms=500) is None
        wait_until(lambda: guard.refused >= 1, what="the unauthorised key to be counted")

        before = guard.refused
        assert request(ctx, endpoint, None, timeout_ms=500) is None
        wait_until(lambda: guard.refused > before, what="the keyless client to be counted")

        # Credentials from the environment, as an engine's service would pass them.
        env = {
            "LMCACHED_CURVE_CLIENT_KEY_FILE": keys["good_sec"],
            "LMCACHED_CURVE_SERVER_KEY_FILE": keys["server_pub"],
        }
        assert request(ctx, endpoint, ClientCurve.load(environ=env)) == b"pong:ping"
    finally:
        stop = True
        t.join()
        guard.stop()
        guard.stop()
        server.close()
        ctx.term()


def test_reload_admits_a_newly_authorised_key(keys, tmp_path):
    ctx = zmq.Context()
    guard = AuthGuard(ctx, ServerCurve(*_server_keys(keys), keys["allowed"]))
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    guard.secure(server)
    endpoint = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        bad = ClientCurve.load(keys["bad_sec"], keys["server_pub"], environ={})
        assert request(ctx, endpoint, bad, timeout_ms=300) is None
        # Authorise "bad" and reload, as SIGHUP does.
        bad_pub = keys["bad_sec"].replace(".key_secret", ".key")
        os.link(bad_pub, os.path.join(keys["allowed"], "bad.key"))
        guard.reload()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        bad.apply(sock)
        sock.connect(endpoint)
        sock.send(b"hello")
        assert server.poll(5000)
        assert server.recv_multipart()[1] == b"hello"
        sock.close()
    finally:
        guard.stop()
        server.close()
        ctx.term()


def _server_keys(keys):
    return zmq.auth.load_certificate(keys["server_sec"])


def test_non_loopback_bind_requires_curve(keys):
    with pytest.raises(ConfigError, match="curve_secret_key_file"):
        config.from_mapping({"host": "0.0.0.0"}, environ={})
    with pytest.raises(ConfigError, match="curve_authorized_keys"):
        config.from_mapping(
            {"host": "0.0.0.0", "curve_secret_key_file": keys["server_sec"]}, environ={}
        )
    full = {
        "host": "0.0.0.0",
        "curve_secret_key_file": keys["server_sec"],
        "curve_authorized_keys": keys["allowed"],
    }
    # TCP is off by default: a non-loopback host without enable_tcp is a mistake, said aloud.
    with pytest.raises(ConfigError, match="enable_tcp"):
        config.from_mapping(full, environ={})
    cfg = config.from_mapping({**full, "enable_tcp": True}, environ={})
    assert cfg.host == "0.0.0.0"
    # Loopback stays keyless by default.
    assert ServerCurve.from_config(config.from_mapping({}, environ={})) is None


def test_secret_key_readable_by_others_is_refused(keys):
    os.chmod(keys["server_sec"], 0o644)
    cfg = config.from_mapping(
        {"curve_secret_key_file": keys["server_sec"], "curve_authorized_keys": keys["allowed"]},
        environ={},
    )
    with pytest.raises(ConfigError, match="chmod 600"):
        ServerCurve.from_config(cfg)


def test_repr_never_shows_secret_keys(keys):
    curve = ClientCurve.load(keys["good_sec"], keys["server_pub"], environ={})
    assert curve.secret.decode() not in repr(curve)
    server = ServerCurve(*_server_keys(keys), keys["allowed"])
    assert server.secret.decode() not in repr(server)


def test_ipc_socket_gets_mode_0660_and_the_group(tmp_path):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    path = str(tmp_path / "w0.sock")
    sock.bind(f"ipc://{path}")
    try:
        gid = os.getgroups()[-1] if os.getgroups() else os.getegid()
        restrict_to_group(path, gid)
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
    finally:
        sock.close(linger=0)
        ctx.term()


def test_a_key_added_to_the_folder_is_admitted_without_a_reload(keys):
    ctx = zmq.Context()
    guard = AuthGuard(ctx, ServerCurve(*_server_keys(keys), keys["allowed"]))
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    guard.secure(server)
    endpoint = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    try:
        bad = ClientCurve.load(keys["bad_sec"], keys["server_pub"], environ={})
        bad_pub = keys["bad_sec"].replace(".key_secret", ".key")
        os.link(bad_pub, os.path.join(keys["allowed"], "bad.key"))
        # Workers have no reload hook: the guard notices the folder change by itself.
        wait_until(lambda: guard.authorized_count == 2, what="the folder watcher to reload")
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        bad.apply(sock)
        sock.connect(endpoint)
        sock.send(b"hello")
        assert server.poll(5000)
        assert server.recv_multipart()[1] == b"hello"
        sock.close()
        os.unlink(os.path.join(keys["allowed"], "bad.key"))
        wait_until(lambda: guard.authorized_count == 1, what="the removed key to be dropped")
    finally:
        guard.stop()
        server.close()
        ctx.term()
