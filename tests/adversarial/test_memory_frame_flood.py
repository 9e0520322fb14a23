"""A peer inside the trust boundary floods a worker with one huge multipart message.

libzmq hands a multipart message to the application only after its last frame, so the worker
cannot refuse it before it is buffered; what it must do is answer with a ``limit`` error, keep
serving other clients, and give the memory back (budget + max_inflight_bytes + 64 MiB).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from lmcached import protocol, runtime
from lmcached.testing import DaemonProcess, wait_until

MiB = 1 << 20
BUDGET = 64 * MiB
INFLIGHT = 8 * MiB
SLACK = 64 * MiB


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    # The limits of the report: 8 MiB per request, 16 keys of 1 MiB blocks (17 frames).
    with DaemonProcess(
        tmp_path_factory.mktemp("flood"),
        num_workers=1,
        max_local_cpu_size="64MiB",
        max_block_size="1MiB",
        max_keys_per_batch=16,
        max_inflight_bytes="8MiB",
    ) as d:
        yield d


def _flood(daemon: DaemonProcess, frames: list[bytes | memoryview]) -> protocol.RawReply:
    """Send one multipart message of ``frames`` to worker 0 with a raw DEALER; return its reply."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(runtime.ipc_endpoint(daemon.cfg, "worker-0"))
        header = protocol.encode_request(protocol.GetRequest([b"flood"], id=7))
        sock.send_multipart([header, *frames], copy=False)
        assert sock.poll(120_000), "the worker never answered the flood"
        return protocol.parse_reply(sock.recv_multipart()[0])
    finally:
        sock.close()
        ctx.term()


def _worker(daemon: DaemonProcess) -> psutil.Process:
    (pid,) = daemon.worker_pids()
    return psutil.Process(pid)


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param(lambda: [memoryview(os.urandom(MiB))] * 400, id="400x1MiB"),
        pytest.param(lambda: [b""] * 2_000_000, id="2M-empty"),
    ],
)
def test_frame_flood_gets_a_limit_reply_and_memory_comes_back(
    daemon: DaemonProcess, frames, tmp_path: Path
) -> None:
    worker = _worker(daemon)
    key, value = b"flood/other-client", os.urandom(MiB)
    with daemon.client(timeout=30) as other:
        other.put([key], [value])
        reply = _flood(daemon, frames())
        assert not reply.ok and reply.header.get("code") == protocol.E_LIMIT, reply.header
        # The other client is served at once (a generous deadline: no timing assert).
        assert bytes(other.get([key], timeout=30)[0]) == value
    bound = BUDGET + INFLIGHT + SLACK
    wait_until(
        lambda: worker.memory_info().rss <= bound,
        10.0,
        what=f"worker RSS back under {bound >> 20} MiB",
    )
    assert worker.is_running() and _worker(daemon).pid == worker.pid
