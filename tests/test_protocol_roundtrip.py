"""Every wire message survives encode -> decode unchanged, requests and replies alike."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcached import protocol
from lmcached.protocol import (
    CONTROL_OPS,
    DATA_OPS,
    ClusterMap,
    DeleteReply,
    DeleteRequest,
    ErrorReply,
    ExistsReply,
    ExistsRequest,
    FlushReply,
    FlushRequest,
    GetReply,
    GetRequest,
    Hello,
    Limits,
    LookupReply,
    LookupRequest,
    MapReply,
    MapRequest,
    PingReply,
    PingRequest,
    ProtocolError,
    PurgeReply,
    PurgeRequest,
    PutReply,
    PutRequest,
    ReloadReply,
    ReloadRequest,
    ShutdownReply,
    ShutdownRequest,
    StatsReply,
    StatsRequest,
    StatusReply,
    StatusRequest,
    WorkerEntry,
    WorkerPingReply,
)
from lmcached.version import PROTOCOL_VERSION

LIMITS = Limits(
    max_block_size=1 << 20,
    max_keys_per_batch=64,
    max_key_length=64,
    max_request_bytes=64 << 20,
    wire_frame_size=1 << 16,
)

ids = st.integers(min_value=0, max_value=(1 << 63) - 1)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
small = st.integers(min_value=0, max_value=1 << 31)
keys = st.lists(st.binary(min_size=1, max_size=64), max_size=16)
daemons = st.none() | st.text(min_size=1, max_size=16)
scalars = st.none() | st.booleans() | st.integers(-(1 << 62), 1 << 62) | st.text(max_size=8)
docs = st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("id", "ok", "d")), scalars)
metas = st.none() | st.dictionaries(st.text(max_size=8), scalars, max_size=3)
# A block's payload: zero or more frames (bytes; on the wire they are zmq frames).
frames = st.lists(st.binary(max_size=64), max_size=3).map(tuple)


@st.composite
def puts(draw: Any) -> PutRequest:
    ks = draw(keys)
    blocks = [draw(frames) for _ in ks]
    return PutRequest(
        ks,
        [sum(len(f) for f in b) for b in blocks],
        blocks,
        metas=draw(st.none() | st.lists(metas, min_size=len(ks), max_size=len(ks))),
        sums=draw(st.none() | st.lists(st.none() | u64, min_size=len(ks), max_size=len(ks))),
        id=draw(ids),
    )


@st.composite
def get_replies(draw: Any) -> GetReply:
    found = draw(st.lists(st.booleans(), max_size=16))
    n = sum(found)
    blocks = [draw(frames) for _ in range(n)]
    return GetReply(
        found,
        [sum(len(f) for f in b) for b in blocks],
        draw(st.lists(metas, min_size=n, max_size=n)),
        draw(st.lists(st.none() | u64, min_size=n, max_size=n)),
        blocks,
        id=draw(ids),
        daemon=draw(daemons),
    )


endpoints = st.dictionaries(st.sampled_from(["tcp", "ipc"]), st.text(min_size=1, max_size=30))
workers = st.builds(
    WorkerEntry,
    id=small,
    state=st.sampled_from(["up", "starting", "backoff", "stopped"]),
    pid=st.none() | small,
    restarts=small,
    tcp=st.none() | st.text(max_size=30),
    ipc=st.none() | st.text(max_size=30),
)
limits = st.builds(Limits, small, small, small, small, small)
cluster_maps = st.builds(
    ClusterMap,
    daemon_id=st.text(max_size=16),
    epoch=small,
    version=st.text(max_size=8),
    protocol=st.just(PROTOCOL_VERSION),
    host_id=st.text(max_size=30),
    chunk_size=small,
    num_workers=small,
    checksums=st.booleans(),
    limits=limits,
    workers=st.lists(workers, max_size=4),
)

data_requests = st.one_of(
    puts(),
    st.builds(GetRequest, keys, id=ids),
    st.builds(LookupRequest, keys, id=ids),
    st.builds(ExistsRequest, keys, id=ids),
    st.builds(DeleteRequest, keys, id=ids),
    st.builds(PurgeRequest, st.binary(max_size=64), id=ids),
    st.builds(
        FlushRequest,
        st.none() | st.floats(min_value=1e-3, max_value=protocol.MAX_FLUSH_WAIT_S),
        id=ids,
    ),
    st.builds(StatsRequest, id=ids),
    st.builds(PingRequest, id=ids),
)
control_requests = st.one_of(
    st.builds(cls, id=ids)
    for cls in (MapRequest, StatusRequest, ShutdownRequest, ReloadRequest, PingRequest)
)
errors = st.builds(
    ErrorReply,
    st.sampled_from([protocol.E_MALFORMED, protocol.E_LIMIT, protocol.E_UNAVAILABLE]),
    st.text(max_size=40),
    id=ids,
    daemon=daemons,
)
# A worker process's random id on put and flush replies; None from an older worker.
incarnations = st.none() | st.integers(min_value=0, max_value=(1 << 63) - 1)
# (op the reply answers, reply)
data_replies = st.one_of(
    st.tuples(
        st.just("put"),
        st.builds(PutReply, small, incarnations, id=ids, daemon=daemons),
    ),
    st.tuples(st.just("get"), get_replies()),
    st.tuples(st.just("lookup"), st.builds(LookupReply, small, id=ids, daemon=daemons)),
    st.tuples(
        st.just("exists"),
        st.builds(ExistsReply, st.lists(st.booleans(), max_size=16), id=ids, daemon=daemons),
    ),
    st.tuples(st.just("delete"), st.builds(DeleteReply, small, id=ids, daemon=daemons)),
    st.tuples(st.just("purge"), st.builds(PurgeReply, small, id=ids, daemon=daemons)),
    st.tuples(
        st.just("flush"),
        st.builds(
            FlushReply,
            st.booleans(),
            st.integers(min_value=0, max_value=1 << 40),
            st.integers(min_value=0, max_value=1 << 40),
            incarnations,
            id=ids,
            daemon=daemons,
        ),
    ),
    st.tuples(st.just("ping"), st.builds(WorkerPingReply, small, small, id=ids, daemon=daemons)),
    st.tuples(st.just("stats"), st.builds(StatsReply, docs, id=ids, daemon=daemons)),
    st.tuples(st.sampled_from(sorted(DATA_OPS)), errors),
)
control_replies = st.one_of(
    st.tuples(st.just("map"), st.builds(MapReply, cluster_maps, id=ids)),
    st.tuples(st.just("ping"), st.builds(PingReply, small, small, st.booleans(), id=ids)),
    st.tuples(st.just("shutdown"), st.builds(ShutdownReply, st.booleans(), id=ids)),
    st.tuples(st.just("reload"), st.builds(ReloadReply, docs, id=ids)),
    st.tuples(st.just("status"), st.builds(StatusReply, docs, id=ids)),
    st.tuples(st.sampled_from(sorted(CONTROL_OPS)), errors),
)


@settings(max_examples=300, deadline=None)
@given(data_requests)
def test_data_request_round_trips(msg: Any) -> None:
    header, payload = protocol.encode(msg), protocol.payload_of(msg)
    assert protocol.decode_request(header, payload, LIMITS, DATA_OPS) == msg


@settings(max_examples=100, deadline=None)
@given(control_requests)
def test_control_request_round_trips(msg: Any) -> None:
    assert protocol.decode_request(protocol.encode(msg), [], LIMITS, CONTROL_OPS) == msg


@settings(max_examples=300, deadline=None)
@given(data_replies)
def test_data_reply_round_trips(case: tuple[str, Any]) -> None:
    op, msg = case
    raw = protocol.parse_reply(protocol.encode(msg))
    assert protocol.decode_data_reply(op, raw, protocol.payload_of(msg)) == msg


@settings(max_examples=200, deadline=None)
@given(control_replies)
def test_control_reply_round_trips(case: tuple[str, Any]) -> None:
    op, msg = case
    assert protocol.decode_control_reply(op, protocol.parse_reply(protocol.encode(msg))) == msg


@settings(max_examples=100, deadline=None)
@given(st.builds(Hello, small, small, endpoints))
def test_hello_round_trips(msg: Hello) -> None:
    assert protocol.decode_hello(protocol.encode(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.builds(StatsReply, docs, id=ids, daemon=daemons), errors))
def test_stats_probe_reply_round_trips(msg: Any) -> None:
    assert protocol.decode_stats_reply(protocol.encode(msg)) == msg


def test_worker_replies_carry_the_daemon_stamp_unless_they_name_one() -> None:
    protocol.REPLY_STAMP["d"] = "daemon-a"
    try:
        raw = protocol.parse_reply(protocol.encode(PutReply(3, id=9)))
        assert (raw.id, raw.daemon) == (9, "daemon-a")
        assert protocol.decode_data_reply("put", raw) == PutReply(3, id=9, daemon="daemon-a")
    finally:
        protocol.REPLY_STAMP.clear()


def test_get_reply_whose_frames_disagree_with_its_header_is_refused() -> None:
    reply = GetReply([True], [3], [None], [None], [(b"abc",)], id=1)
    raw = protocol.parse_reply(protocol.encode(reply))
    with pytest.raises(ProtocolError) as err:
        protocol.decode_data_reply("get", raw, [b"ab", b"c"])
    assert err.value.code == protocol.E_MALFORMED


def test_map_of_another_protocol_version_is_a_version_error() -> None:
    header = protocol.pack({"id": 1, "ok": True, "map": {"protocol": PROTOCOL_VERSION + 1}})
    with pytest.raises(ProtocolError) as err:
        protocol.decode_control_reply("map", protocol.parse_reply(header))
    assert err.value.code == protocol.E_VERSION


def test_request_errors_carry_the_request_id() -> None:
    header = protocol.pack({"v": PROTOCOL_VERSION, "op": "get", "id": 42, "keys": b"x"})
    with pytest.raises(ProtocolError) as err:
        protocol.decode_request(header, [], LIMITS, DATA_OPS)
    assert (err.value.code, err.value.request_id) == (protocol.E_MALFORMED, 42)


def test_flush_wait_asked_by_a_client_is_bounded_by_the_worker() -> None:
    for asked in (1e9, float("inf")):
        header = msgpack.packb({"v": PROTOCOL_VERSION, "op": "flush", "id": 1, "timeout": asked})
        req = protocol.decode_request(header, [], LIMITS, DATA_OPS)
        assert req == FlushRequest(protocol.MAX_FLUSH_WAIT_S, id=1)


def test_put_with_a_meta_over_max_meta_bytes_is_a_limit_error() -> None:
    limits = Limits(**{**LIMITS.as_dict(), "max_meta_bytes": 1024})
    meta = {"blob": b"m" * 2000}
    msg = PutRequest([b"k"], [1], [[b"x"]], metas=[meta])
    with pytest.raises(protocol.ProtocolError) as err:
        protocol.decode_request(protocol.encode(msg), [b"x"], limits, DATA_OPS)
    assert err.value.code == protocol.E_LIMIT and "max_meta_bytes" in str(err.value)


def test_limits_from_an_older_map_default_max_meta_bytes() -> None:
    old = {k: v for k, v in LIMITS.as_dict().items() if k != "max_meta_bytes"}
    assert Limits.from_dict(old).max_meta_bytes == protocol.DEFAULT_MAX_META_BYTES


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, 0, "10", True])
def test_flush_timeout_nan_or_nonsense_means_the_workers_default(timeout: Any) -> None:
    header = protocol.pack({"v": PROTOCOL_VERSION, "op": "flush", "id": 3, "timeout": timeout})
    req = protocol.decode_request(header, [], LIMITS, DATA_OPS)
    assert isinstance(req, protocol.FlushRequest) and req.timeout is None
