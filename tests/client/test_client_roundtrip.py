"""Client contract: round trips with real bytes through a real daemon."""

from __future__ import annotations

import os
import random

import pytest

from lmcached import LMCachedRequestError, LMCachedTimeout
from lmcached.client import Client
from lmcached.keys import KeyBuilder
from lmcached.routing import owner


def rand_blocks(n: int, size: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(n)]


def test_put_get_many_sizes_bytes_equal(shared_daemon):
    with shared_daemon.client(timeout=30) as c:
        for size in (1, 4096, 256 * 1024, 2 << 20):
            keys = [f"rt/{size}/{i}".encode() for i in range(8)]
            vals = rand_blocks(8, size, size)
            c.put(keys, vals)
            got = c.get(keys)
            assert [bytes(g) for g in got] == vals


def test_32mib_blocks_round_trip_through_subframes(shared_daemon):
    vals = [os.urandom(32 << 20), os.urandom((32 << 20) + 12345)]
    keys = [b"rt/big/0", b"rt/big/1"]
    with shared_daemon.client(timeout=60) as c:
        c.put(keys, vals)
        got = c.get(keys)
        assert bytes(got[0]) == vals[0]
        assert bytes(got[1]) == vals[1]
        bufs = [bytearray(len(v)) for v in vals]
        assert c.get_into(keys, bufs) == [True, True]
        assert bufs[0] == vals[0] and bufs[1] == vals[1]


def test_missing_keys_are_none_and_metas_round_trip(shared_daemon):
    with shared_daemon.client() as c:
        meta = {"dtype": "bfloat16", "shape": [2, 8, 256, 128], "codec": "none"}
        c.put([b"meta/a"], [b"payload"], metas=[meta])
        got = c.get_with_meta([b"meta/a", b"meta/missing"])
        assert got[1] is None
        assert bytes(got[0][0]) == b"payload"
        assert got[0][1] == meta
        assert c.get([b"meta/missing"]) == [None]


def test_lookup_counts_the_leading_hits_across_workers(shared_daemon):
    keys = [f"lk/{i}".encode() for i in range(40)]
    assert len({owner(k, 2) for k in keys}) == 2
    with shared_daemon.client() as c:
        c.put(keys[:25], [b"x"] * 25)
        assert c.lookup(keys) == 25
        assert c.lookup(keys[:10]) == 10
        c.delete([keys[3]])
        assert c.lookup(keys) == 3
        assert c.exists([keys[0], keys[3], keys[30]]) == [True, False, False]


def test_delete_and_purge(shared_daemon):
    with shared_daemon.client() as c:
        keys = [f"ns-a/m/{i}".encode() for i in range(20)] + [
            f"ns-b/m/{i}".encode() for i in range(5)
        ]
        c.put(keys, [b"v"] * len(keys))
        assert c.delete([keys[0], b"ns-a/never"]) == 1
        assert c.purge(b"ns-a/") == 19
        assert c.exists(keys[1:3]) == [False, False]
        assert all(c.exists(keys[20:]))


def test_keys_land_on_every_worker(shared_daemon):
    with shared_daemon.client() as c:
        keys = [f"spread/{i}".encode() for i in range(64)]
        c.put(keys, [b"x" * 10] * 64)
        status = c.stats()
        per_worker = [w["stats"]["store"]["cpu"]["entries"] for w in status["workers"]]
        assert len(per_worker) == 2
        assert all(n > 0 for n in per_worker), per_worker


def test_limits_are_checked_before_sending(shared_daemon):
    with shared_daemon.client() as c:
        limits = c.cluster_map["limits"]
        with pytest.raises(LMCachedRequestError):
            c.put([b"k" * (limits["max_key_length"] + 1)], [b"v"])
        with pytest.raises(LMCachedRequestError):
            c.put([b"too-big"], [bytearray(limits["max_block_size"] + 1)])
        with pytest.raises(LMCachedRequestError):
            c.put([b"a", b"b"], [b"1"])
        with pytest.raises(LMCachedRequestError):
            c.get([42])  # type: ignore[list-item]  # str keys are accepted (UTF-8); ints are not
        # The client still works after refusing bad input.
        c.put([b"after-limits"], [b"ok"])
        assert bytes(c.get([b"after-limits"])[0]) == b"ok"


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "zmq"])
def test_values_and_buffers_that_are_not_bytes_like_get_a_one_line_error(
    shared_daemon, shared_memory
):
    # They raised bare TypeErrors from memoryview (a strided get_into buffer only once its
    # block had arrived); now LMCachedRequestError, checked before anything is sent.
    np = pytest.importorskip("numpy")
    with shared_daemon.client(shared_memory=shared_memory) as c:
        c.put([b"sinks/0"], [bytes(4096)])
        for value, says in (("text", "value 0 is a str"), (None, "value 0 is a NoneType")):
            with pytest.raises(LMCachedRequestError, match=says):
                c.put([b"sinks/bad"], [value])
        grid = np.zeros((64, 128), dtype=np.uint8)
        for sink, says in (
            (grid[:, ::2], "buffer 0 is not contiguous"),
            (bytes(4096), "buffer 0 is read-only"),
            (42, "buffer 0 is a int"),
            (bytearray(10), "buffer 0 is smaller than the block"),
        ):
            with pytest.raises(LMCachedRequestError, match=says):
                c.get_into([b"sinks/0"], [sink])
        assert c.get([b"sinks/bad"]) == [None]
        # A contiguous array of another shape and dtype is written as bytes.
        floats = np.ones(1024, dtype=np.float32)
        assert c.get_into([b"sinks/0"], [floats]) == [True]
        assert not floats.any()


def test_batches_larger_than_the_key_limit_are_split(shared_daemon):
    with shared_daemon.client(timeout=30) as c:
        n = c.cluster_map["limits"]["max_keys_per_batch"] + 300
        keys = [f"many/{i}".encode() for i in range(n)]
        c.put(keys, [i.to_bytes(4, "little") for i in range(n)])
        got = c.get(keys)
        assert [int.from_bytes(g, "little") for g in got] == list(range(n))
        assert c.lookup(keys) == n


def test_call_to_a_dead_endpoint_times_out_with_its_deadline():
    with Client("tcp://127.0.0.1:9", timeout=0.3) as c, pytest.raises(LMCachedTimeout):
        c.get([b"k"])


def test_close_is_idempotent_and_closed_client_refuses(shared_daemon):
    c = shared_daemon.client()
    c.ping()
    c.close()
    c.close()
    with pytest.raises(LMCachedRequestError):
        c.get([b"k"])


def test_client_is_fork_safe(shared_daemon):
    with shared_daemon.client() as c:
        c.put([b"fork/parent"], [b"p"])
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: the inherited client must rebuild its sockets and work
            ok = False
            try:
                c.put([b"fork/child"], [b"c"])
                ok = bytes(c.get([b"fork/parent"])[0]) == b"p"
            finally:
                os.write(w, b"1" if ok else b"0")
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"1"
        os.waitpid(pid, 0)
        assert bytes(c.get([b"fork/child"])[0]) == b"c"


def _routed_chain(route: str, n: int) -> list[bytes]:
    """Chunk keys of one prompt in key format v2: every chunk carries the first chunk's route."""
    return [f"chain/m@r/l/{route}-{i:032x}".encode() for i in range(n)]


def _worker_ops(c: Client) -> list[dict[str, int]]:
    return [w["stats"]["ops"]["requests"] for w in c.stats()["workers"]]


def test_lookup_of_one_routed_prompt_is_one_request_to_one_worker(shared_daemon):
    keys = _routed_chain("00c0ffee", 128)
    assert len({owner(k, 2) for k in keys}) == 1
    # Over ZMQ (a same-host client answers from the presence index: tests/shm).
    with shared_daemon.client(shared_memory=False) as c:
        c.put(keys[:100], [b"x"] * 100)
        before = _worker_ops(c)
        assert c.lookup(keys) == 100
        after = _worker_ops(c)
        sent = [
            {op: n - b.get(op, 0) for op, n in a.items() if op != "stats" and n != b.get(op, 0)}
            for a, b in zip(after, before, strict=True)
        ]
        assert sorted(sent, key=len) == [{}, {"lookup": 1}]
        c.delete([keys[0]])
        assert c.lookup(keys) == 0


def test_lookup_of_one_chain_validates_every_key(shared_daemon):
    """The one-worker lookup path checks keys in bulk; a single bad key still fails the call."""
    kb = KeyBuilder(namespace="chk", model="m", chunk_size=4)
    keys = kb.chunk_keys(list(range(4 * 16)))
    with shared_daemon.client() as c:
        limit = c.cluster_map["limits"]["max_key_length"]
        c.put(keys, [b"v"] * len(keys))
        assert c.lookup(keys) == len(keys)
        for bad in (b"", keys[3] + b"x" * limit, 7, None):
            with pytest.raises(LMCachedRequestError):
                c.lookup([*keys[:5], bad, *keys[5:]])  # type: ignore[list-item]
        # str keys are UTF-8 bytes keys, also when mixed with bytes in one chain.
        mixed = [k.decode() if i % 2 else k for i, k in enumerate(keys)]
        assert c.lookup(mixed) == len(keys)
        # A key of exactly the limit is valid; a missing one ends the prefix.
        assert c.lookup([*keys[:7], b"k" * limit, *keys[7:]]) == 7
