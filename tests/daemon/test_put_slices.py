"""A large put runs in slices: a get that arrives while it is in progress is answered first.

One raw DEALER connection sends puts that are slow by construction (full batches of the longest
keys, or direct same-host puts of 32 MiB blocks to copy and hash into the arena) and then a get. A worker that served
each request to its end before reading the next one answered every put before the get; one that
slices puts answers the get while the last put is still in progress. Checked by the order of the
replies on the connection, never by a duration.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import xxhash
import zmq

from lmcached import protocol, runtime
from lmcached.client.shared import buffer_address
from lmcached.testing import DaemonProcess

MiB = 1 << 20
PROBE = b"slices/probe"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(
        tmp_path_factory.mktemp("slices"), num_workers=1, max_local_cpu_size="256MiB"
    ) as d:
        yield d


def _long_keys(tag: str) -> protocol.PutRequest:
    """A full batch of 0-byte blocks under keys of max_key_length (512) bytes."""
    keys = [f"slices/{tag}/{i}/".encode().ljust(512, b"k") for i in range(4096)]
    empty = xxhash.xxh3_64_intdigest(b"")
    return protocol.PutRequest(keys, [0] * len(keys), [()] * len(keys), sums=[empty] * len(keys))


# What the direct puts below store, by key: the worker reads it from this process's memory, so
# it must stay alive (and unchanged) until the put is answered.
_PAYLOADS: dict[bytes, bytes] = {}


def _big_blocks(tag: str) -> protocol.PutRequest:
    """Two 32 MiB blocks in one direct same-host put: the worker copies and hashes each into
    the arena. (A ZMQ put keeps the frames it received: nothing there takes long.)"""
    keys = [f"slices/{tag}/{i}".encode() for i in range(2)]
    for key in keys:
        _PAYLOADS[key] = os.urandom(32 * MiB)
    return protocol.PutRequest(
        keys,
        [32 * MiB] * len(keys),
        [()] * len(keys),
        addrs=[buffer_address(memoryview(_PAYLOADS[k])) for k in keys],
        until=time.monotonic_ns() + 120 * 10**9,
    )


@pytest.mark.parametrize(
    ("make", "count"),
    [
        pytest.param(_long_keys, 3, id="long-keys"),
        pytest.param(_big_blocks, 2, id="large-blocks"),
    ],
)
def test_get_is_answered_while_a_large_put_is_in_progress(
    daemon: DaemonProcess, make: Callable[[str], protocol.PutRequest], count: int, tmp_path: Path
) -> None:
    value = os.urandom(4096)
    with daemon.client(timeout=60) as c:
        c.put([PROBE], [value])
        puts = [make(f"{tmp_path.name}-{n}") for n in range(count)]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(runtime.ipc_endpoint(daemon.cfg, "worker-0"))
            for n, put in enumerate(puts, start=1):
                put.id = n
                sock.send_multipart([protocol.encode_request(put), *protocol.payload_of(put)])
            get = protocol.GetRequest([PROBE], id=100)
            sock.send(protocol.encode_request(get))
            order: list[int] = []
            replies: dict[int, tuple[protocol.RawReply, list[zmq.Frame]]] = {}
            while len(order) < count + 1:
                assert sock.poll(120_000), f"no reply after {order}"
                msg = sock.recv_multipart(copy=False)
                raw = protocol.parse_reply(msg[0].bytes)
                assert raw.ok, raw.header
                assert raw.id is not None
                order.append(raw.id)
                replies[raw.id] = (raw, msg[1:])
        finally:
            sock.close()
            ctx.term()
        assert sorted(order) == [*range(1, count + 1), 100]
        # Puts are answered in their order, the get before the last of them.
        assert [i for i in order if i != 100] == list(range(1, count + 1))
        assert order.index(100) < order.index(count), order
        raw, frames = replies[100]
        got = protocol.decode_data_reply("get", raw, frames)
        assert isinstance(got, protocol.GetReply) and got.found == [True]
        # Every put stored every block, and the blocks read back whole.
        for n, put in enumerate(puts, start=1):
            raw, frames = replies[n]
            reply = protocol.decode_data_reply("put", raw, frames)
            assert isinstance(reply, protocol.PutReply) and reply.stored == len(put.keys)
        last = puts[-1]
        sample = [last.keys[0], last.keys[-1]]
        assert all(v is not None for v in c.get(sample))
        if last.sizes[0]:
            assert bytes(c.get([last.keys[0]])[0]) == _PAYLOADS[last.keys[0]]
