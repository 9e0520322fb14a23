"""Helpers of the shared-memory tests: worker processes and their stats."""

from __future__ import annotations

from typing import Any

import msgpack
import zmq

from lmcached.version import PROTOCOL_VERSION


def cpu_stats(client: Any) -> list[dict[str, Any]]:
    """Every worker's CPU-tier counters, in worker order."""
    return [w["stats"]["store"]["cpu"] for w in client.stats()["workers"]]


def worker_pid(client: Any, worker: int) -> int:
    pid = client.cluster_map["workers"][worker]["pid"]
    assert isinstance(pid, int)
    return pid


def raw_put(d: Any, worker: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Send a hand-written put header (``fields`` added) to ``worker`` of daemon ``d`` through a
    raw socket, as a client of this process; return the reply header."""
    return raw_request(d, worker, {"op": "put", **fields})[0]


def raw_request(d: Any, worker: int, fields: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """Send a hand-written request header to ``worker`` of daemon ``d`` through a raw socket;
    return the reply header and the reply's payload frames."""
    with d.client() as c:
        endpoint = c.cluster_map["workers"][worker]["ipc"]
    header = {"v": PROTOCOL_VERSION, "id": 7, **fields}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(msgpack.packb(header, use_bin_type=True))
        assert sock.poll(20_000), "worker did not answer"
        first, *payload = sock.recv_multipart()
        reply: dict[str, Any] = msgpack.unpackb(first)
        return reply, payload
    finally:
        sock.close()
        ctx.term()
