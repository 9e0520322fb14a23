"""The wire protocol between clients, the scheduler and workers.

A message is a ZMQ multipart: one msgpack **header frame**, then zero or more raw **payload
frames**. A block's payload is one frame, or several sub-frames of at most ``wire_frame_size``
bytes (see ``nframes``). Payloads never pass through msgpack.

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
=========  ===================================================================================

Reply header: ``{"id": <id>, "ok": true, ...op fields}`` or
``{"id": <id>, "ok": false, "code": <str>, "error": <str>}``. A ``get`` reply carries
``found``, ``sizes``, ``nframes``, ``metas`` and ``sums``, followed by the payload frames of the
found blocks in key order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from lmcached.version import PROTOCOL_VERSION

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

# Headers are small: keys are bounded, so a header never needs more than this much room.
HEADER_SLACK = 64 * 1024


class ProtocolError(Exception):
    """A request that cannot be served as sent; becomes an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """What a worker accepts; published in the cluster map so clients check before sending."""

    max_block_size: int
    max_keys_per_batch: int
    max_key_length: int
    max_request_bytes: int
    wire_frame_size: int

    @property
    def max_header_bytes(self) -> int:
        return self.max_keys_per_batch * (self.max_key_length + 48) + HEADER_SLACK

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Limits:
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


@dataclass(slots=True)
class Request:
    """A decoded, validated request."""

    op: str
    id: int
    header: dict[str, Any]
    keys: list[bytes] = field(default_factory=list)
    # put only: payload frames grouped per block, each group in wire order.
    blocks: list[tuple[Any, ...]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def pack(header: dict[str, Any]) -> bytes:
    """Serialise a header map."""
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(data: bytes, max_bytes: int) -> dict[str, Any]:
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


def request_id_of(header: dict[str, Any]) -> int:
    rid = header.get("id", 0)
    return rid if isinstance(rid, int) and not isinstance(rid, bool) else 0


def _int_list(header: dict[str, Any], name: str, n: int) -> list[int]:
    value = header.get(name)
    if not isinstance(value, list) or len(value) != n:
        raise ProtocolError(E_MALFORMED, f"'{name}' must be a list of {n} integers")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ProtocolError(E_MALFORMED, f"'{name}' must hold non-negative integers")
    return value


def decode_request(
    header_bytes: bytes, payload: Sequence[Any], limits: Limits, allowed_ops: frozenset[str]
) -> Request:
    """Validate every field of a request and return it; raise ProtocolError otherwise.

    ``payload`` holds the frames after the header (zmq.Frame objects or buffers); they are
    grouped per block, never copied.
    """
    header = unpack_header(header_bytes, limits.max_header_bytes)
    rid = request_id_of(header)
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
    req = Request(op=op, id=rid, header=header)
    if op in KEYED_OPS:
        keys = header.get("keys")
        if not isinstance(keys, list):
            raise ProtocolError(E_MALFORMED, "'keys' must be a list of bytes")
        if len(keys) > limits.max_keys_per_batch:
            raise ProtocolError(
                E_LIMIT, f"{len(keys)} keys exceed max_keys_per_batch={limits.max_keys_per_batch}"
            )
        for k in keys:
            if not isinstance(k, bytes) or not k:
                raise ProtocolError(E_MALFORMED, "every key must be non-empty bytes")
            if len(k) > limits.max_key_length:
                raise ProtocolError(
                    E_LIMIT, f"key of {len(k)} bytes exceeds max_key_length={limits.max_key_length}"
                )
        req.keys = keys
    elif op == "purge":
        prefix = header.get("prefix")
        if not isinstance(prefix, bytes) or len(prefix) > limits.max_key_length:
            raise ProtocolError(E_MALFORMED, "'prefix' must be bytes no longer than a key")
    if op == "put":
        _decode_put(req, payload, limits)
    elif payload:
        raise ProtocolError(E_MALFORMED, f"op '{op}' takes no payload frames, got {len(payload)}")
    return req


def _decode_put(req: Request, payload: Sequence[Any], limits: Limits) -> None:
    n = len(req.keys)
    sizes = _int_list(req.header, "sizes", n)
    nframes = _int_list(req.header, "nframes", n)
    for name in ("metas", "sums"):
        value = req.header.get(name)
        if value is not None and (not isinstance(value, list) or len(value) != n):
            raise ProtocolError(E_MALFORMED, f"'{name}' must be nil or a list of {n} entries")
    metas = req.header.get("metas")
    if metas is not None and not all(m is None or isinstance(m, dict) for m in metas):
        raise ProtocolError(E_MALFORMED, "'metas' entries must be maps or nil")
    sums = req.header.get("sums")
    if sums is not None and not all(
        s is None or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 64)
        for s in sums
    ):
        raise ProtocolError(E_MALFORMED, "'sums' entries must be unsigned 64-bit integers or nil")
    if sum(nframes) != len(payload):
        raise ProtocolError(
            E_MALFORMED,
            f"header announces {sum(nframes)} payload frames, message has {len(payload)}",
        )
    total = 0
    blocks: list[tuple[Any, ...]] = []
    pos = 0
    for size, count in zip(sizes, nframes, strict=True):
        if size > limits.max_block_size:
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
            if flen > limits.wire_frame_size:
                raise ProtocolError(
                    E_LIMIT,
                    f"payload frame of {flen} bytes exceeds wire_frame_size={limits.wire_frame_size}",
                )
            got += flen
        if got != size:
            raise ProtocolError(E_MALFORMED, f"block announced {size} bytes, frames hold {got}")
        total += size
        blocks.append(group)
    if total > limits.max_request_bytes:
        raise ProtocolError(
            E_LIMIT,
            f"request of {total} bytes exceeds max_request_bytes={limits.max_request_bytes}",
        )
    req.blocks = blocks
    req.sizes = sizes


def split_payload(buf: Any, frame_size: int) -> list[memoryview]:
    """Split a contiguous buffer into views of at most ``frame_size`` bytes (no copy)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c") or mv.itemsize != 1:
        mv = mv.cast("B") if mv.c_contiguous else memoryview(bytes(mv))
    n = mv.nbytes
    if n <= frame_size:
        return [mv]
    return [mv[i : i + frame_size] for i in range(0, n, frame_size)]


# Stamped on every worker reply as "d", so a client notices a restarted daemon whose workers
# reappeared on the same ipc paths and refreshes its map instead of trusting a stale one.
REPLY_STAMP: dict[str, Any] = {}


def error_reply(rid: int, code: str, message: str) -> bytes:
    return pack({"id": rid, "ok": False, "code": code, "error": message, **REPLY_STAMP})


def ok_reply(rid: int, **fields: Any) -> bytes:
    fields["id"] = rid
    fields["ok"] = True
    fields.update(REPLY_STAMP)
    return pack(fields)
