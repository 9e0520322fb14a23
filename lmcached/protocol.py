"""The wire protocol between clients, the scheduler and workers: every message, both directions.

A message is a ZMQ multipart: one msgpack **header frame**, then zero or more raw **payload
frames**. A block's payload is one frame, or several sub-frames of at most ``wire_frame_size``
bytes (see ``nframes``). Payloads never pass through msgpack.

This is the only module that spells a header field name. Every message is a slotted dataclass;
:func:`encode` turns one into its header frame (and :func:`payload_of` gives its payload frames),
and the ``decode_*`` functions turn frames back into messages, validating every field.

Request header fields (a msgpack map with string keys):

=========  ===================================================================================
``v``      protocol version (int); a mismatch gets the ``version`` error
``op``     one of :data:`DATA_OPS` (workers) or :data:`CONTROL_OPS` (scheduler)
``id``     request id (int), echoed in the reply so that pipelined replies can be matched
``keys``   list of bin keys (put, get, lookup, exists, delete)
``sizes``  put: payload bytes of each block
``nframes``put: payload frames of each block (sum must equal the frames that follow)
``metas``  put: optional list of maps (or nil) stored with each block
``sums``   put: optional list of xxh3-64 checksums of each payload (or nil)
``prefix`` purge: bin key prefix
``timeout``flush: seconds the worker may wait for its tiers' write queues
``shm``    get: the client maps the worker's arena; found CPU-tier blocks come back as slots
``release``get: lease ids of earlier same-host gets that the client is done with
``stage``  put: the client's staging file path, or ``memfd:<pid>:<fd>:<nonce>``; the blocks are
           read from it, not from frames
``offsets``put with ``stage``: where each block starts in the staging area
``addrs``  put (direct, same host over ipc): where each block starts in the sender's own memory;
           the worker copies it from there (docs/same-host.md), no payload frames
``until``  put with ``addrs``, or with a memfd ``stage`` and no ``sums`` (a buffer from
           ``Client.buffer``): the sender's deadline, ``CLOCK_MONOTONIC`` in ns; the worker
           must not use bytes it finished reading from the sender's memory after it
=========  ===================================================================================

A ``flush`` reply carries ``done`` and, per worker, ``dropped`` and ``failed``: the lower-tier
copies of this connection's puts (since its previous flush) that a full write queue dropped or
whose write failed. Both are absent (read as 0) from workers older than this field. ``put`` and
``flush`` replies also carry the worker process's ``incarnation`` (a random integer drawn at its
start): a flush answered by another incarnation than a put since the previous flush means the
worker that held that put's pending writes died, and the client reports those blocks as
unconfirmed instead of flushed.

Reply header: ``{"id": <id>, "ok": true, ...op fields}`` or
``{"id": <id>, "ok": false, "code": <str>, "error": <str>}``; a worker stamps ``"d": <daemon
id>`` on every reply. A ``get`` reply carries ``found``, ``sizes``, ``nframes``, ``metas`` and
``sums``, followed by the payload frames of the found blocks in key order. To a get with
``shm``, a block held in the arena is answered by an entry of ``slots`` (``[index, generation,
offset, length]``, see :mod:`lmcached.shm.layout`) and no frame (its ``nframes`` is 0); the
reply's ``lease`` id keeps those slots from reuse until released or ``lease_timeout``, and its
``arena`` names the arena file the slots are in.

Internal messages: a worker announces itself to the scheduler with :class:`Hello`; the scheduler
probes a worker with a :class:`StatsRequest`, answered by a :class:`StatsReply`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import msgpack

from lmcached.version import PROTOCOL_VERSION

__all__ = [
    "CONTROL_OPS",
    "DATA_OPS",
    "DEFAULT_MAX_META_BYTES",
    "E_INTERNAL",
    "E_LIMIT",
    "E_MALFORMED",
    "E_UNAVAILABLE",
    "E_UNKNOWN_OP",
    "E_VERSION",
    "KEYED_OPS",
    "MAX_REPLY_HEADER",
    "ClusterMap",
    "ControlReply",
    "ControlRequest",
    "DataReply",
    "DataRequest",
    "DeleteReply",
    "DeleteRequest",
    "ErrorReply",
    "ExistsReply",
    "ExistsRequest",
    "FlushReply",
    "FlushRequest",
    "GetReply",
    "GetRequest",
    "Hello",
    "Limits",
    "LookupReply",
    "LookupRequest",
    "MapReply",
    "MapRequest",
    "PingReply",
    "PingRequest",
    "ProtocolError",
    "PurgeReply",
    "PurgeRequest",
    "PutReply",
    "PutRequest",
    "RawReply",
    "ReloadReply",
    "ReloadRequest",
    "ShutdownReply",
    "ShutdownRequest",
    "StatsReply",
    "StatsRequest",
    "StatusReply",
    "StatusRequest",
    "WorkerEntry",
    "WorkerPingReply",
    "decode_control_reply",
    "decode_data_reply",
    "decode_hello",
    "decode_request",
    "decode_stats_reply",
    "encode",
    "encode_hello",
    "encode_reply",
    "encode_request",
    "meta_size",
    "parse_reply",
    "payload_of",
    "reply_fields",
    "split_payload",
]

DATA_OPS = frozenset(
    {"put", "get", "lookup", "exists", "delete", "purge", "stats", "ping", "flush"}
)
CONTROL_OPS = frozenset({"map", "status", "shutdown", "reload", "ping"})
KEYED_OPS = frozenset({"put", "get", "lookup", "exists", "delete"})

# Error codes (stable strings; clients map them onto exception classes).
E_MALFORMED = "malformed"
E_VERSION = "version"
E_UNKNOWN_OP = "unknown_op"
E_LIMIT = "limit"
E_INTERNAL = "internal"
E_UNAVAILABLE = "unavailable"
# The worker holds max_inflight_bytes of requests, or its I/O queue is full: retry later.
E_BUSY = "busy"

# Headers are small: keys are bounded, so a header never needs more than this much room.
HEADER_SLACK = 64 * 1024
# The default cap on one block's metadata, msgpack-encoded (config: max_meta_bytes). Metas the
# project writes are far smaller: the codecs' three fields, a client's dtype and shape.
DEFAULT_MAX_META_BYTES = 64 * 1024
# The longest a worker waits for its write queues on one flush, whatever the client asks: the
# wait holds one of the worker's I/O threads.
MAX_FLUSH_WAIT_S = 600.0
# The most a client accepts in one reply header (a get reply's metas, a status document).
MAX_REPLY_HEADER = 64 << 20
# Most lease ids one get may release.
MAX_RELEASES = 4096
# The scheduler's bounds on what workers send it.
MAX_HELLO_HEADER = 1 << 16
MAX_STATS_HEADER = 16 << 20

# A payload frame: a zmq.Frame, memoryview, bytes ... anything with len() and the buffer protocol.
Frame = Any
Header = dict[str, Any]


class ProtocolError(Exception):
    """A message that cannot be served or trusted as sent; a request's becomes an error reply."""

    def __init__(self, code: str, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # The id of the request it answers, once known, so the error reply can be matched.
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Limits:
    """What a worker accepts; published in the cluster map so clients check before sending."""

    max_block_size: int
    max_keys_per_batch: int
    max_key_length: int
    max_request_bytes: int
    wire_frame_size: int
    max_meta_bytes: int = DEFAULT_MAX_META_BYTES

    @property
    def max_header_bytes(self) -> int:
        # Room for a full batch of the longest keys, and for one block's largest meta; a client
        # splits a put whose metas need more (see put_header_cost).
        return (
            self.max_keys_per_batch * (self.max_key_length + 48)
            + HEADER_SLACK
            + self.max_meta_bytes
        )

    @property
    def max_frames(self) -> int:
        per_block = -(-self.max_block_size // self.wire_frame_size)
        return 1 + self.max_keys_per_batch * per_block

    def as_dict(self) -> dict[str, int]:
        return {
            "max_block_size": self.max_block_size,
            "max_keys_per_batch": self.max_keys_per_batch,
            "max_key_length": self.max_key_length,
            "max_request_bytes": self.max_request_bytes,
            "wire_frame_size": self.wire_frame_size,
            "max_meta_bytes": self.max_meta_bytes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Limits:
        return cls(
            max_block_size=int(d["max_block_size"]),
            max_keys_per_batch=int(d["max_keys_per_batch"]),
            max_key_length=int(d["max_key_length"]),
            max_request_bytes=int(d["max_request_bytes"]),
            wire_frame_size=int(d["wire_frame_size"]),
            # Absent from the maps of older daemons: they enforced the default's order of size.
            max_meta_bytes=int(d.get("max_meta_bytes", DEFAULT_MAX_META_BYTES)),
        )


# ---------------------------------------------------------------------------------------------
# Field checks (shared by every decoder).
# ---------------------------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(header: Header, name: str) -> int:
    v = header.get(name)
    if not _is_int(v):
        raise ProtocolError(E_MALFORMED, f"'{name}' must be an integer, got {v!r}")
    assert isinstance(v, int)
    return v


def _opt_int(header: Header, name: str) -> int | None:
    v = header.get(name)
    return None if v is None else _int(header, name)


def _str(header: Header, name: str) -> str:
    v = header.get(name)
    if not isinstance(v, str):
        raise ProtocolError(E_MALFORMED, f"'{name}' must be a string, got {v!r}")
    return v


def _opt_str(header: Header, name: str) -> str | None:
    v = header.get(name)
    return None if v is None else _str(header, name)


def _bool(header: Header, name: str) -> bool:
    v = header.get(name)
    if not isinstance(v, bool):
        raise ProtocolError(E_MALFORMED, f"'{name}' must be a boolean, got {v!r}")
    return v


def _map(header: Header, name: str) -> dict[str, Any]:
    v = header.get(name)
    if not isinstance(v, dict):
        raise ProtocolError(E_MALFORMED, f"'{name}' must be a map, got {type(v).__name__}")
    return v


def _int_list(header: Header, name: str, n: int) -> list[int]:
    value = header.get(name)
    if not isinstance(value, list) or len(value) != n:
        raise ProtocolError(E_MALFORMED, f"'{name}' must be a list of {n} integers")
    # A full batch has 4,096 entries, checked on the worker's loop: C-level passes for the
    # common all-good list (bool is its own type, so it fails the first test); the loop below
    # says what is wrong.
    if not value or (set(map(type, value)) == {int} and min(value) >= 0):
        return value
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ProtocolError(E_MALFORMED, f"'{name}' must hold non-negative integers")
    return value


def _opt_list(header: Header, name: str, n: int) -> list[Any] | None:
    value = header.get(name)
    if value is not None and (not isinstance(value, list) or len(value) != n):
        raise ProtocolError(E_MALFORMED, f"'{name}' must be nil or a list of {n} entries")
    return value


def _metas(header: Header, n: int, max_meta_bytes: int) -> list[dict[str, Any] | None] | None:
    metas = _opt_list(header, "metas", n)
    if metas is None:
        return None
    for i, m in enumerate(metas):
        if m is None:
            continue
        if not isinstance(m, dict):
            raise ProtocolError(E_MALFORMED, "'metas' entries must be maps or nil")
        size = meta_size(m)
        if size > max_meta_bytes:
            raise ProtocolError(
                E_LIMIT,
                f"meta of block {i} is {size} bytes; max_meta_bytes is {max_meta_bytes}",
            )
    return metas


def meta_size(meta: Mapping[str, Any]) -> int:
    """Return the msgpack size of one block's metadata: what ``max_meta_bytes`` bounds."""
    return len(msgpack.packb(meta, use_bin_type=True))


def _sums(header: Header, n: int) -> list[int | None] | None:
    sums = _opt_list(header, "sums", n)
    if sums and set(map(type, sums)) == {int} and min(sums) >= 0 and max(sums) < 1 << 64:
        return sums  # the common case in C-level passes, as in _int_list
    if sums is not None and not all(
        s is None or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 64)
        for s in sums
    ):
        raise ProtocolError(E_MALFORMED, "'sums' entries must be unsigned 64-bit integers or nil")
    return sums


def _group_frames(
    payload: Sequence[Frame], nframes: Sequence[int], sizes: Sequence[int], limits: Limits | None
) -> list[Sequence[Frame]]:
    """Group payload frames per block (no copy) and check each block's announced size."""
    if sum(nframes) != len(payload):
        raise ProtocolError(
            E_MALFORMED,
            f"header announces {sum(nframes)} payload frames, message has {len(payload)}",
        )
    blocks: list[Sequence[Frame]] = []
    pos = 0
    for size, count in zip(sizes, nframes, strict=True):
        if limits is not None and size > limits.max_block_size:
            raise ProtocolError(
                E_LIMIT, f"block of {size} bytes exceeds max_block_size={limits.max_block_size}"
            )
        if count < 1 and size > 0:
            raise ProtocolError(E_MALFORMED, "a non-empty block needs at least one frame")
        group = tuple(payload[pos : pos + count])
        pos += count
        got = 0
        for frame in group:
            flen = len(frame)
            if limits is not None and flen > limits.wire_frame_size:
                raise ProtocolError(
                    E_LIMIT,
                    f"payload frame of {flen} bytes exceeds wire_frame_size={limits.wire_frame_size}",
                )
            got += flen
        if got != size:
            raise ProtocolError(E_MALFORMED, f"block announced {size} bytes, frames hold {got}")
        blocks.append(group)
    return blocks


def _flatten(blocks: Sequence[Sequence[Frame]]) -> list[Frame]:
    out: list[Frame] = []
    for group in blocks:
        out.extend(group)
    return out


# ---------------------------------------------------------------------------------------------
# Requests. ``id`` is set by the sender just before encoding (pipelined requests get theirs
# when they leave).
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Request:
    id: int = 0


@dataclass(slots=True)
class _Keyed(_Request):
    keys: list[bytes]

    def _fields(self) -> Header:
        return {"keys": self.keys}


@dataclass(slots=True)
class GetRequest(_Keyed):
    """Fetch the blocks of ``keys``; with ``shm``, arena blocks come back as slot references."""

    shm: bool = False
    release: list[int] = field(default_factory=list)
    op: ClassVar[str] = "get"

    def _fields(self) -> Header:
        fields: Header = {"keys": self.keys}
        if self.shm:
            fields["shm"] = True
        if self.release:
            fields["release"] = self.release
        return fields


@dataclass(slots=True)
class LookupRequest(_Keyed):
    """Count the leading ``keys`` present in the worker."""

    op: ClassVar[str] = "lookup"


@dataclass(slots=True)
class ExistsRequest(_Keyed):
    """Ask whether each of ``keys`` is present."""

    op: ClassVar[str] = "exists"


@dataclass(slots=True)
class DeleteRequest(_Keyed):
    """Remove ``keys`` from every tier."""

    op: ClassVar[str] = "delete"


@dataclass(slots=True)
class PutRequest(_Request):
    """Store one block per key; ``blocks`` holds each block's payload frames in wire order."""

    keys: list[bytes]
    sizes: list[int]
    blocks: list[Sequence[Frame]]
    metas: list[dict[str, Any] | None] | None = None
    sums: list[int | None] | None = None
    # Same-host put: the blocks are in this staging file at these offsets (no payload frames).
    stage: str | None = None
    offsets: list[int] | None = None
    # Direct same-host put: the blocks are at these addresses in the sender's own memory,
    # readable by the worker until ``until`` (CLOCK_MONOTONIC, ns).
    addrs: list[int] | None = None
    until: int | None = None
    op: ClassVar[str] = "put"

    def _fields(self) -> Header:
        fields: Header = {
            "keys": self.keys,
            "sizes": self.sizes,
            "nframes": [len(group) for group in self.blocks],
        }
        if self.metas is not None:
            fields["metas"] = self.metas
        if self.sums is not None:
            fields["sums"] = self.sums
        if self.stage is not None:
            fields["stage"] = self.stage
            fields["offsets"] = self.offsets
        if self.addrs is not None:
            fields["addrs"] = self.addrs
        if self.until is not None:
            fields["until"] = self.until
        return fields


@dataclass(slots=True)
class PurgeRequest(_Request):
    """Remove every key that starts with ``prefix``."""

    prefix: bytes
    op: ClassVar[str] = "purge"

    def _fields(self) -> Header:
        return {"prefix": self.prefix}


@dataclass(slots=True)
class FlushRequest(_Request):
    """Wait up to ``timeout`` seconds (None: the worker's default) for the write queues."""

    timeout: float | None = None
    op: ClassVar[str] = "flush"

    def _fields(self) -> Header:
        return {} if self.timeout is None else {"timeout": self.timeout}


@dataclass(slots=True)
class _Bare(_Request):
    def _fields(self) -> Header:
        return {}


@dataclass(slots=True)
class StatsRequest(_Bare):
    """Ask a worker for its counters (the scheduler's probe, too)."""

    op: ClassVar[str] = "stats"


@dataclass(slots=True)
class PingRequest(_Bare):
    """Round-trip a worker or the scheduler."""

    op: ClassVar[str] = "ping"


@dataclass(slots=True)
class MapRequest(_Bare):
    """Ask the scheduler for the cluster map."""

    op: ClassVar[str] = "map"


@dataclass(slots=True)
class StatusRequest(_Bare):
    """Ask the scheduler for the status document (every worker's stats)."""

    op: ClassVar[str] = "status"


@dataclass(slots=True)
class ShutdownRequest(_Bare):
    """Ask the scheduler to stop the daemon."""

    op: ClassVar[str] = "shutdown"


@dataclass(slots=True)
class ReloadRequest(_Bare):
    """Ask the scheduler to reload (as SIGHUP does)."""

    op: ClassVar[str] = "reload"


DataRequest: TypeAlias = (
    PutRequest
    | GetRequest
    | LookupRequest
    | ExistsRequest
    | DeleteRequest
    | PurgeRequest
    | StatsRequest
    | PingRequest
    | FlushRequest
)
ControlRequest: TypeAlias = (
    MapRequest | StatusRequest | ShutdownRequest | ReloadRequest | PingRequest
)
AnyRequest: TypeAlias = DataRequest | ControlRequest

CONTROL_REQUESTS: dict[str, type[ControlRequest]] = {
    "map": MapRequest,
    "status": StatusRequest,
    "shutdown": ShutdownRequest,
    "reload": ReloadRequest,
    "ping": PingRequest,
}


@dataclass(slots=True)
class Hello:
    """A worker's announcement to the scheduler: who it is and where it listens."""

    worker_id: int
    pid: int
    endpoints: dict[str, str]
    op: ClassVar[str] = "hello"

    def _fields(self) -> Header:
        return {"worker_id": self.worker_id, "pid": self.pid, "endpoints": self.endpoints}


# ---------------------------------------------------------------------------------------------
# Replies.
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class _Reply:
    id: int = 0
    # The stamp a worker puts on every reply (None from the scheduler).
    daemon: str | None = None
    ok: ClassVar[bool] = True


@dataclass(slots=True)
class ErrorReply(_Reply):
    """A refused or failed request: a stable ``code`` (E_*) and a sentence for a person."""

    code: str
    error: str
    ok: ClassVar[bool] = False

    def _fields(self) -> Header:
        return {"code": self.code, "error": self.error}


@dataclass(slots=True)
class PutReply(_Reply):
    stored: int
    # The worker process that took the blocks (see the module docstring); None: an older worker.
    incarnation: int | None = None

    def _fields(self) -> Header:
        fields: Header = {"stored": self.stored}
        if self.incarnation is not None:
            fields["incarnation"] = self.incarnation
        return fields

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> PutReply:
        return cls(_int(h, "stored"), _opt_int(h, "incarnation"))


@dataclass(slots=True)
class GetReply(_Reply):
    """``found`` has one flag per requested key; the other lists one entry per found block."""

    found: list[bool]
    sizes: list[int]
    metas: list[dict[str, Any] | None]
    sums: list[int | None]
    blocks: list[Sequence[Frame]]
    # Same-host replies: per found block, [index, generation, offset, length] or None (frames).
    slots: list[list[int] | None] | None = None
    lease: int | None = None
    # The arena the slots are in: a client whose mapping is another (a restarted worker that
    # reappeared on the same socket path) must map this one, never read the old one.
    arena: str | None = None

    def _fields(self) -> Header:
        fields: Header = {
            "found": self.found,
            "sizes": self.sizes,
            "nframes": [len(group) for group in self.blocks],
            "metas": self.metas,
            "sums": self.sums,
        }
        if self.slots is not None:
            fields["slots"] = self.slots
            fields["lease"] = self.lease
            fields["arena"] = self.arena
        return fields

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> GetReply:
        # The hot path of every get: the shape of the reply is checked (list types, lengths,
        # frame counts) with C-level calls, not every element, which is as far as a client
        # needs to trust the daemon's own workers.
        found, sizes, nframes = h.get("found"), h.get("sizes"), h.get("nframes")
        metas, sums = h.get("metas"), h.get("sums")
        if not (
            type(found) is list
            and type(sizes) is list
            and type(nframes) is list
            and type(metas) is list
            and type(sums) is list
        ):
            raise ProtocolError(E_MALFORMED, "a get reply needs found, sizes, nframes, metas, sums")
        hits = found.count(True)
        if found.count(False) + hits != len(found):
            raise ProtocolError(E_MALFORMED, "'found' must be a list of booleans")
        if not len(sizes) == len(nframes) == len(metas) == len(sums) == hits:
            raise ProtocolError(E_MALFORMED, f"a get reply with {hits} hits lists other counts")
        if sum(nframes) != len(payload):
            raise ProtocolError(
                E_MALFORMED,
                f"header announces {sum(nframes)} payload frames, message has {len(payload)}",
            )
        slots, lease, arena = h.get("slots"), h.get("lease"), h.get("arena")
        if slots is not None:
            if not (
                type(slots) is list
                and len(slots) == hits
                and _is_int(lease)
                and isinstance(arena, str)
            ):
                raise ProtocolError(
                    E_MALFORMED, "'slots' needs one entry per hit, a 'lease' and an 'arena'"
                )
            blocks = _group_slot_frames(payload, nframes, slots)
            return cls(found, sizes, metas, sums, blocks, slots, lease, arena)
        if nframes.count(1) == hits:  # every block in one frame: the common case
            blocks = [(f,) for f in payload]
        else:
            blocks = _group_frames(payload, nframes, sizes, None)
        return cls(found, sizes, metas, sums, blocks)


def _group_slot_frames(
    payload: Sequence[Frame], nframes: list[Any], slots: list[Any]
) -> list[Sequence[Frame]]:
    """Group a same-host reply's frames: a block answered by a slot has none."""
    blocks: list[Sequence[Frame]] = []
    pos = 0
    for n, slot in zip(nframes, slots, strict=True):
        if not _is_int(n) or n < 0 or (slot is not None and n != 0):
            raise ProtocolError(E_MALFORMED, "a block comes as a slot or as frames, not both")
        blocks.append(tuple(payload[pos : pos + n]))
        pos += n
    return blocks


@dataclass(slots=True)
class LookupReply(_Reply):
    hit: int

    def _fields(self) -> Header:
        return {"hit": self.hit}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> LookupReply:
        return cls(_int(h, "hit"))


@dataclass(slots=True)
class ExistsReply(_Reply):
    flags: list[bool]

    def _fields(self) -> Header:
        return {"flags": self.flags}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> ExistsReply:
        flags = h.get("flags")
        if type(flags) is not list or flags.count(True) + flags.count(False) != len(flags):
            raise ProtocolError(E_MALFORMED, "'flags' must be a list of booleans")
        return cls(flags)


@dataclass(slots=True)
class DeleteReply(_Reply):
    count: int

    def _fields(self) -> Header:
        return {"count": self.count}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> DeleteReply:
        return cls(_int(h, "count"))


@dataclass(slots=True)
class PurgeReply(_Reply):
    count: int

    def _fields(self) -> Header:
        return {"count": self.count}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> PurgeReply:
        return cls(_int(h, "count"))


@dataclass(slots=True)
class FlushReply(_Reply):
    """``done``: the queues drained in time. ``dropped``/``failed``: this connection's lost
    lower-tier copies since its previous flush (see the module docstring)."""

    done: bool
    dropped: int = 0
    failed: int = 0
    incarnation: int | None = None  # the worker process that answered (see PutReply)

    def _fields(self) -> Header:
        fields: Header = {"done": self.done, "dropped": self.dropped, "failed": self.failed}
        if self.incarnation is not None:
            fields["incarnation"] = self.incarnation
        return fields

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> FlushReply:
        counts = []
        for name in ("dropped", "failed"):
            value = h.get(name, 0)
            if type(value) is not int or value < 0:
                raise ProtocolError(E_MALFORMED, f"{name!r} must be a non-negative int")
            counts.append(value)
        return cls(_bool(h, "done"), counts[0], counts[1], _opt_int(h, "incarnation"))


@dataclass(slots=True)
class WorkerPingReply(_Reply):
    worker_id: int
    pid: int

    def _fields(self) -> Header:
        return {"worker_id": self.worker_id, "pid": self.pid}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> WorkerPingReply:
        return cls(_int(h, "worker_id"), _int(h, "pid"))


@dataclass(slots=True)
class StatsReply(_Reply):
    """A worker's counters: a free-form document of its store, ops, latency and extras."""

    stats: dict[str, Any]

    def _fields(self) -> Header:
        return dict(self.stats)

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> StatsReply:
        return cls({k: v for k, v in h.items() if k not in _ENVELOPE})


@dataclass(slots=True)
class WorkerEntry:
    """One worker id in the cluster map."""

    id: int
    state: str
    pid: int | None
    restarts: int
    tcp: str | None
    ipc: str | None
    # Path of the worker's shared-memory arena (same-host clients map it); None when off.
    arena: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "tcp": self.tcp,
            "ipc": self.ipc,
            "arena": self.arena,
        }

    @classmethod
    def from_dict(cls, d: Header) -> WorkerEntry:
        return cls(
            id=_int(d, "id"),
            state=_str(d, "state"),
            pid=_opt_int(d, "pid"),
            restarts=_int(d, "restarts"),
            tcp=_opt_str(d, "tcp"),
            ipc=_opt_str(d, "ipc"),
            arena=_opt_str(d, "arena"),
        )

    @property
    def up(self) -> bool:
        return self.state == "up"


@dataclass(slots=True)
class ClusterMap:
    """Where every worker listens and what it accepts; clients route with it."""

    daemon_id: str
    epoch: int
    version: str
    protocol: int
    host_id: str
    chunk_size: int
    num_workers: int
    checksums: bool
    limits: Limits
    workers: list[WorkerEntry] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "daemon_id": self.daemon_id,
            "epoch": self.epoch,
            "version": self.version,
            "protocol": self.protocol,
            "host_id": self.host_id,
            "chunk_size": self.chunk_size,
            "num_workers": self.num_workers,
            "checksums": self.checksums,
            "limits": self.limits.as_dict(),
            "workers": [w.as_dict() for w in self.workers],
        }

    @classmethod
    def from_dict(cls, d: Header) -> ClusterMap:
        protocol = d.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                E_VERSION, f"daemon speaks protocol {protocol}, this client {PROTOCOL_VERSION}"
            )
        workers = d.get("workers")
        if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
            raise ProtocolError(E_MALFORMED, "'workers' must be a list of maps")
        try:
            limits = Limits.from_dict(_map(d, "limits"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(E_MALFORMED, f"'limits' is incomplete: {exc}") from None
        return cls(
            daemon_id=_str(d, "daemon_id"),
            epoch=_int(d, "epoch"),
            version=_str(d, "version"),
            protocol=PROTOCOL_VERSION,
            host_id=_str(d, "host_id"),
            chunk_size=_int(d, "chunk_size"),
            num_workers=_int(d, "num_workers"),
            checksums=_bool(d, "checksums"),
            limits=limits,
            workers=[WorkerEntry.from_dict(w) for w in workers],
        )


@dataclass(slots=True)
class MapReply(_Reply):
    map: ClusterMap

    def _fields(self) -> Header:
        return {"map": self.map.as_dict()}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> MapReply:
        return cls(ClusterMap.from_dict(_map(h, "map")))


@dataclass(slots=True)
class PingReply(_Reply):
    """The scheduler's answer to ping."""

    pid: int
    epoch: int
    ready: bool

    def _fields(self) -> Header:
        return {"pid": self.pid, "epoch": self.epoch, "ready": self.ready}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> PingReply:
        return cls(_int(h, "pid"), _int(h, "epoch"), _bool(h, "ready"))


@dataclass(slots=True)
class ShutdownReply(_Reply):
    stopping: bool

    def _fields(self) -> Header:
        return {"stopping": self.stopping}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> ShutdownReply:
        return cls(_bool(h, "stopping"))


@dataclass(slots=True)
class ReloadReply(_Reply):
    """What each reload hook reported (e.g. the number of CURVE clients admitted)."""

    reloaded: dict[str, Any]

    def _fields(self) -> Header:
        return {"reloaded": self.reloaded}

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> ReloadReply:
        return cls(_map(h, "reloaded"))


@dataclass(slots=True)
class StatusReply(_Reply):
    """The scheduler's status document: map facts, and per worker its state and stats."""

    status: dict[str, Any]

    def _fields(self) -> Header:
        return dict(self.status)

    @classmethod
    def _decode(cls, h: Header, payload: Sequence[Frame]) -> StatusReply:
        return cls({k: v for k, v in h.items() if k not in _ENVELOPE})

    def tier_totals(self) -> dict[str, dict[str, int]]:
        """Sum every worker's integer tier counters, per tier."""
        totals: dict[str, dict[str, int]] = {}
        workers = self.status.get("workers")
        for w in workers if isinstance(workers, list) else []:
            stats = w.get("stats") if isinstance(w, dict) else None
            store = stats.get("store") if isinstance(stats, dict) else None
            for tier, counters in (store if isinstance(store, dict) else {}).items():
                if not isinstance(counters, dict):
                    continue
                agg = totals.setdefault(tier, {})
                for name, value in counters.items():
                    if _is_int(value):
                        agg[name] = agg.get(name, 0) + value
        return totals


DataReply: TypeAlias = (
    PutReply
    | GetReply
    | LookupReply
    | ExistsReply
    | DeleteReply
    | PurgeReply
    | FlushReply
    | WorkerPingReply
    | StatsReply
)
ControlReply: TypeAlias = MapReply | PingReply | ShutdownReply | ReloadReply | StatusReply
AnyReply: TypeAlias = DataReply | ControlReply | ErrorReply
Message: TypeAlias = AnyRequest | AnyReply | Hello

_REPLY_TYPES = (
    ErrorReply,
    PutReply,
    GetReply,
    LookupReply,
    ExistsReply,
    DeleteReply,
    PurgeReply,
    FlushReply,
    WorkerPingReply,
    StatsReply,
    MapReply,
    PingReply,
    ShutdownReply,
    ReloadReply,
    StatusReply,
)

# Fields every reply carries besides its own.
_ENVELOPE = frozenset({"id", "ok", "d"})

_DecodeFn = Callable[[Header, Sequence[Frame]], Any]
DATA_REPLIES: dict[str, _DecodeFn] = {
    "put": PutReply._decode,
    "get": GetReply._decode,
    "lookup": LookupReply._decode,
    "exists": ExistsReply._decode,
    "delete": DeleteReply._decode,
    "purge": PurgeReply._decode,
    "flush": FlushReply._decode,
    "ping": WorkerPingReply._decode,
    "stats": StatsReply._decode,
}
CONTROL_REPLIES: dict[str, _DecodeFn] = {
    "map": MapReply._decode,
    "ping": PingReply._decode,
    "shutdown": ShutdownReply._decode,
    "reload": ReloadReply._decode,
    "status": StatusReply._decode,
}


# ---------------------------------------------------------------------------------------------
# Encoding.
# ---------------------------------------------------------------------------------------------

# Stamped on every worker reply as "d", so a client notices a restarted daemon whose workers
# reappeared on the same ipc paths and refreshes its map instead of trusting a stale one.
REPLY_STAMP: dict[str, Any] = {}


def pack(header: Header) -> bytes:
    """Serialise a header map."""
    data: bytes = msgpack.packb(header, use_bin_type=True)
    return data


def encode_request(request: AnyRequest) -> bytes:
    """Return the header frame of a request (msgpack, once); its payload is :func:`payload_of`."""
    fields = request._fields()
    fields["v"] = PROTOCOL_VERSION
    fields["op"] = request.op
    fields["id"] = request.id
    return pack(fields)


def reply_fields(reply: AnyReply) -> Header:
    """Return a reply as the header map it travels as (what ``Client.control`` hands back)."""
    fields = reply._fields()
    fields["id"] = reply.id
    fields["ok"] = reply.ok
    if reply.daemon is not None:
        fields["d"] = reply.daemon
    return fields


def encode_reply(reply: AnyReply) -> bytes:
    """Return the header frame of a reply, stamped with the daemon id where one is set."""
    fields = reply_fields(reply)
    if reply.daemon is None and REPLY_STAMP:
        fields.update(REPLY_STAMP)
    return pack(fields)


def encode_hello(hello: Hello) -> bytes:
    """Return a worker's announcement frame."""
    fields = hello._fields()
    fields["v"] = PROTOCOL_VERSION
    fields["op"] = hello.op
    return pack(fields)


def encode(msg: Message) -> bytes:
    """Return the header frame of any message (tests and tools; senders call the typed ones)."""
    if isinstance(msg, Hello):
        return encode_hello(msg)
    if isinstance(msg, _REPLY_TYPES):
        return encode_reply(msg)
    return encode_request(msg)


def payload_of(msg: Message) -> list[Frame]:
    """Return the payload frames that follow the header of ``msg`` (the caller's, uncopied)."""
    if isinstance(msg, (PutRequest, GetReply)):
        return _flatten(msg.blocks)
    return []


def split_payload(buf: Any, frame_size: int) -> list[memoryview]:
    """Split a contiguous buffer into views of at most ``frame_size`` bytes (no copy)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c") or mv.itemsize != 1:
        mv = mv.cast("B") if mv.c_contiguous else memoryview(bytes(mv))
    n = mv.nbytes
    if n <= frame_size:
        return [mv]
    return [mv[i : i + frame_size] for i in range(0, n, frame_size)]


# ---------------------------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------------------------


def unpack_header(data: bytes | memoryview, max_bytes: int) -> Header:
    """Parse a header frame; raise ProtocolError for anything that is not a bounded map."""
    if len(data) > max_bytes:
        raise ProtocolError(E_LIMIT, f"header of {len(data)} bytes exceeds {max_bytes}")
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(E_MALFORMED, f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(E_MALFORMED, f"header must be a map, got {type(header).__name__}")
    return header


def request_id_of(header: Header) -> int:
    rid = header.get("id", 0)
    return rid if _is_int(rid) else 0


def decode_request(
    header_bytes: bytes | memoryview,
    payload: Sequence[Frame],
    limits: Limits,
    allowed_ops: frozenset[str],
) -> AnyRequest:
    """Validate every field of a request and return it; raise ProtocolError otherwise.

    ``payload`` holds the frames after the header (zmq.Frame objects or buffers); a put's are
    grouped per block, never copied. The error carries the request id once it is known.
    """
    header = unpack_header(header_bytes, limits.max_header_bytes)
    rid = request_id_of(header)
    try:
        return _decode_request(header, rid, payload, limits, allowed_ops)
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def _decode_request(
    header: Header,
    rid: int,
    payload: Sequence[Frame],
    limits: Limits,
    allowed_ops: frozenset[str],
) -> AnyRequest:
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            E_VERSION,
            f"protocol version {version!r} not supported; this daemon speaks {PROTOCOL_VERSION}",
        )
    op = header.get("op")
    if not isinstance(op, str) or op not in allowed_ops:
        raise ProtocolError(
            E_UNKNOWN_OP, f"unknown op {op!r}; expected one of {sorted(allowed_ops)}"
        )
    if op != "put" and payload:
        raise ProtocolError(E_MALFORMED, f"op '{op}' takes no payload frames, got {len(payload)}")
    if op in KEYED_OPS:
        keys = _keys(header, limits)
        if op == "get":
            return _decode_get(header, keys, rid)
        if op == "exists":
            return ExistsRequest(keys, id=rid)
        if op == "put":
            return _decode_put(header, keys, rid, payload, limits)
        if op == "lookup":
            return LookupRequest(keys, id=rid)
        return DeleteRequest(keys, id=rid)
    if op == "purge":
        prefix = header.get("prefix")
        if not isinstance(prefix, bytes) or len(prefix) > limits.max_key_length:
            raise ProtocolError(E_MALFORMED, "'prefix' must be bytes no longer than a key")
        return PurgeRequest(prefix, id=rid)
    if op == "flush":
        # As lenient as ever: a missing or nonsensical timeout means the worker's default.
        timeout = header.get("timeout")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not timeout > 0  # NaN too
        ):
            return FlushRequest(None, id=rid)
        # NaN fails every comparison, so min() alone would pass it through.
        wait = float(timeout) if timeout == timeout else MAX_FLUSH_WAIT_S
        return FlushRequest(min(wait, MAX_FLUSH_WAIT_S), id=rid)
    if op == "stats":
        return StatsRequest(id=rid)
    return CONTROL_REQUESTS[op](id=rid)


def _keys(header: Header, limits: Limits) -> list[bytes]:
    keys = header.get("keys")
    if not isinstance(keys, list):
        raise ProtocolError(E_MALFORMED, "'keys' must be a list of bytes")
    if len(keys) > limits.max_keys_per_batch:
        raise ProtocolError(
            E_LIMIT, f"{len(keys)} keys exceed max_keys_per_batch={limits.max_keys_per_batch}"
        )
    # The common all-good batch costs two C-level passes (the distinct lengths are few: a
    # prompt's chunk keys share one); the loop below names the bad key.
    if keys and set(map(type, keys)) == {bytes}:
        lengths = set(map(len, keys))
        if min(lengths) > 0 and max(lengths) <= limits.max_key_length:
            return keys
    for k in keys:
        if not isinstance(k, bytes) or not k:
            raise ProtocolError(E_MALFORMED, "every key must be non-empty bytes")
        if len(k) > limits.max_key_length:
            raise ProtocolError(
                E_LIMIT, f"key of {len(k)} bytes exceeds max_key_length={limits.max_key_length}"
            )
    return keys


def _decode_get(header: Header, keys: list[bytes], rid: int) -> GetRequest:
    shm = header.get("shm", False)
    release = header.get("release", [])
    if not isinstance(shm, bool):
        raise ProtocolError(E_MALFORMED, "'shm' must be a boolean")
    if not (isinstance(release, list) and all(_is_int(r) for r in release)):
        raise ProtocolError(E_MALFORMED, "'release' must be a list of lease ids")
    if len(release) > MAX_RELEASES:
        raise ProtocolError(E_LIMIT, f"more than {MAX_RELEASES} lease ids in one get")
    return GetRequest(keys, shm, release, id=rid)


def _until(header: Header) -> int:
    raw_until: Any = header.get("until")
    if not _is_int(raw_until) or raw_until < 0:
        raise ProtocolError(E_MALFORMED, "a same-host put needs 'until' (ns)")
    return int(raw_until)


def _decode_put(
    header: Header, keys: list[bytes], rid: int, payload: Sequence[Frame], limits: Limits
) -> PutRequest:
    n = len(keys)
    sizes = _int_list(header, "sizes", n)
    nframes = _int_list(header, "nframes", n)
    metas = _metas(header, n, limits.max_meta_bytes)
    sums = _sums(header, n)
    stage = header.get("stage")
    offsets: list[int] | None = None
    addrs: list[int] | None = None
    until: int | None = None
    if stage is not None and "addrs" in header:
        raise ProtocolError(E_MALFORMED, "a put takes 'stage' or 'addrs', not both")
    if stage is not None:
        if not isinstance(stage, str) or not stage:
            raise ProtocolError(E_MALFORMED, "'stage' must be a staging file path")
        if "until" in header:
            # A client's own buffer (Client.buffer): no checksums, read until its deadline.
            if sums is not None or not stage.startswith("memfd:"):
                raise ProtocolError(
                    E_MALFORMED, "a put with 'stage' and 'until' names a memfd and has no 'sums'"
                )
            until = _until(header)
        elif sums is None or any(s is None for s in sums):
            raise ProtocolError(E_MALFORMED, "a put with 'stage' needs every block's checksum")
        offsets = _int_list(header, "offsets", n)
    elif "addrs" in header:
        addrs = _int_list(header, "addrs", n)
        until = _until(header)
    if stage is not None or addrs is not None:
        if payload or any(nframes):
            raise ProtocolError(E_MALFORMED, "a same-host put takes no payload frames")
        blocks: list[Sequence[Frame]] = [() for _ in range(n)]
        if sizes and max(sizes) > limits.max_block_size:  # _int_list refused negative sizes
            raise ProtocolError(E_LIMIT, f"a block exceeds max_block_size={limits.max_block_size}")
    else:
        blocks = _group_frames(payload, nframes, sizes, limits)
    total = sum(sizes)
    if total > limits.max_request_bytes:
        raise ProtocolError(
            E_LIMIT,
            f"request of {total} bytes exceeds max_request_bytes={limits.max_request_bytes}",
        )
    return PutRequest(keys, sizes, blocks, metas, sums, stage, offsets, addrs, until, id=rid)


@dataclass(slots=True)
class RawReply:
    """A reply header parsed far enough to match it with its request (id, ok, daemon stamp)."""

    id: int | None
    ok: bool
    daemon: str | None
    header: Header


def parse_reply(data: bytes, max_bytes: int = MAX_REPLY_HEADER) -> RawReply:
    """Parse a reply's header frame; the op-specific fields are decoded by ``decode_*_reply``."""
    header = unpack_header(data, max_bytes)
    rid = header.get("id")
    daemon = header.get("d")
    return RawReply(
        rid if _is_int(rid) else None,
        header.get("ok") is True,
        daemon if isinstance(daemon, str) else None,
        header,
    )


def _decode_reply(
    table: Mapping[str, _DecodeFn], op: str, raw: RawReply, payload: Sequence[Frame]
) -> Any:
    h = raw.header
    if not raw.ok:
        code, error = h.get("code"), h.get("error")
        return ErrorReply(str(code), str(error), id=raw.id or 0, daemon=raw.daemon)
    reply = table[op](h, payload)
    reply.id = raw.id or 0
    reply.daemon = raw.daemon
    return reply


def decode_data_reply(
    op: str, raw: RawReply, payload: Sequence[Frame] = ()
) -> DataReply | ErrorReply:
    """Decode a worker's reply to a request of ``op``; raise ProtocolError if malformed."""
    reply: DataReply | ErrorReply = _decode_reply(DATA_REPLIES, op, raw, payload)
    return reply


def decode_control_reply(op: str, raw: RawReply) -> ControlReply | ErrorReply:
    """Decode the scheduler's reply to a control request of ``op``."""
    reply: ControlReply | ErrorReply = _decode_reply(CONTROL_REPLIES, op, raw, ())
    return reply


def decode_stats_reply(data: bytes) -> StatsReply | ErrorReply:
    """Decode a worker's answer to the scheduler's stats probe."""
    reply: StatsReply | ErrorReply = _decode_reply(
        DATA_REPLIES, "stats", parse_reply(data, MAX_STATS_HEADER), ()
    )
    return reply


def decode_hello(data: bytes) -> Hello:
    """Decode a worker's announcement; raise ProtocolError for anything else."""
    h = unpack_header(data, MAX_HELLO_HEADER)
    if h.get("op") != Hello.op:
        raise ProtocolError(E_UNKNOWN_OP, f"expected a hello, got op {h.get('op')!r}")
    endpoints = _map(h, "endpoints")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in endpoints.items()):
        raise ProtocolError(E_MALFORMED, "'endpoints' must map transport names to endpoints")
    return Hello(_int(h, "worker_id"), _int(h, "pid"), endpoints)
