"""Malformed input straight to worker and control sockets: error replies, and the daemon serves on."""

from __future__ import annotations

import random

import msgpack
import pytest
import zmq

from lmcached.version import PROTOCOL_VERSION


def _worker_endpoint(d, wid=0):
    with d.client() as c:
        return c.cluster_map["workers"][wid]["ipc"]


@pytest.fixture
def worker_sock(shared_daemon):
    """A raw DEALER connected straight to worker 0's data endpoint."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(_worker_endpoint(shared_daemon))
    yield sock
    sock.close()


def _send(sock, frames, expect_reply=True, timeout_ms=3000):
    sock.send_multipart(frames)
    if not expect_reply:
        return None
    if not sock.poll(timeout_ms):
        return None
    return msgpack.unpackb(sock.recv_multipart()[0], raw=False)


def hdr(**fields):
    return msgpack.packb({"v": PROTOCOL_VERSION, "id": 7, **fields}, use_bin_type=True)


CASES = [
    ("garbage", [b"\xff\xfe\x00garbage"], "malformed"),
    ("truncated msgpack", [hdr(op="get", keys=[b"a" * 50])[:-10]], "malformed"),
    ("not a map", [msgpack.packb([1, 2, 3])], "malformed"),
    ("wrong version", [msgpack.packb({"v": 999, "op": "ping", "id": 1})], "version"),
    ("unknown op", [hdr(op="explode")], "unknown_op"),
    ("keys not a list", [hdr(op="get", keys=b"abc")], "malformed"),
    ("key not bytes", [hdr(op="get", keys=["text"])], "malformed"),
    ("empty key", [hdr(op="get", keys=[b""])], "malformed"),
    ("sizes wrong type", [hdr(op="put", keys=[b"a"], sizes=["1"], nframes=[1]), b"x"], "malformed"),
    (
        "frame count mismatch",
        [hdr(op="put", keys=[b"a"], sizes=[1], nframes=[2]), b"x"],
        "malformed",
    ),
    ("size mismatch", [hdr(op="put", keys=[b"a"], sizes=[5], nframes=[1]), b"x"], "malformed"),
    ("payload on get", [hdr(op="get", keys=[b"a"]), b"extra"], "malformed"),
    (
        "bad metas",
        [hdr(op="put", keys=[b"a"], sizes=[1], nframes=[1], metas=[5]), b"x"],
        "malformed",
    ),
    (
        "bad sums",
        [hdr(op="put", keys=[b"a"], sizes=[1], nframes=[1], sums=[-1]), b"x"],
        "malformed",
    ),
    ("bool id", [msgpack.packb({"v": PROTOCOL_VERSION, "op": "ping", "id": True, "x": 1})], None),
    ("purge prefix wrong type", [hdr(op="purge", prefix=5)], "malformed"),
]


@pytest.mark.parametrize("name,frames,code", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_error_reply(worker_sock, name, frames, code):
    reply = _send(worker_sock, frames)
    assert reply is not None, f"no reply to {name}"
    if code is None:
        assert reply["ok"] is True
    else:
        assert reply["ok"] is False and reply["code"] == code, reply


def test_limits_violations_get_limit_errors(shared_daemon, worker_sock):
    sock = worker_sock
    with shared_daemon.client() as c:
        limits = c.cluster_map["limits"]
    too_many = [f"k{i}".encode() for i in range(limits["max_keys_per_batch"] + 1)]
    assert _send(sock, [hdr(op="exists", keys=too_many)])["code"] == "limit"
    long_key = b"k" * (limits["max_key_length"] + 1)
    assert _send(sock, [hdr(op="exists", keys=[long_key])])["code"] == "limit"
    max_frames = 1 + limits["max_keys_per_batch"] * -(
        -limits["max_block_size"] // limits["wire_frame_size"]
    )
    frames = [hdr(op="put", keys=[b"a"], sizes=[1], nframes=[1])] + [b"x"] * (max_frames + 1)
    reply = _send(sock, frames)
    assert reply["ok"] is False and reply["code"] == "limit"


def test_oversized_frame_is_dropped_and_the_worker_keeps_serving(shared_daemon, worker_sock):
    sock = worker_sock
    with shared_daemon.client() as c:
        limits = c.cluster_map["limits"]
    # Above ZMQ_MAXMSGSIZE libzmq drops the connection without a reply: the backstop.
    big = bytes(limits["wire_frame_size"] + (1 << 16))
    assert (
        _send(
            sock,
            [hdr(op="put", keys=[b"a"], sizes=[len(big)], nframes=[1]), big],
            timeout_ms=500,
        )
        is None
    )
    with shared_daemon.client() as c:
        c.put([b"after-oversize"], [b"fine"])
        assert bytes(c.get([b"after-oversize"])[0]) == b"fine"


def test_random_junk_then_valid_traffic(shared_daemon):
    rng = random.Random(1234)
    ctx = zmq.Context.instance()
    for target in ("worker", "control"):
        ep = (
            _worker_endpoint(shared_daemon, 1) if target == "worker" else shared_daemon.ipc_endpoint
        )
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)
        for _ in range(200):
            frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.3:
                good = msgpack.packb(
                    {
                        "v": PROTOCOL_VERSION,
                        "op": rng.choice(["put", "get", "map", "status"]),
                        "id": 1,
                        "keys": [rng.randbytes(4)],
                        "sizes": [rng.randint(-1, 3)],
                        "nframes": [rng.randint(0, 2)],
                    }
                )
                frames[0] = good[: rng.randint(1, len(good))]
            sock.send_multipart(frames)
        while sock.poll(300):
            sock.recv_multipart()
        sock.close()
    with shared_daemon.client() as c:
        c.put([b"post-fuzz"], [b"ok"])
        assert bytes(c.get([b"post-fuzz"])[0]) == b"ok"
        assert all(w["state"] == "up" and w["restarts"] == 0 for w in c.cluster_map["workers"])
