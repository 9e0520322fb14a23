"""The on-disk and on-remote block format: a self-describing header in front of the payload.

The byte layout is specified normatively in ``docs/format.md``; this module is its only
implementation. Every disk file and every remote value is ``header || payload``. The header names
the key, so a disk tier can rebuild its index by scanning files, and carries an xxh3-64 checksum
of the payload, so a reader never returns bytes that were torn, truncated or flipped.

A checksum protects against accidents only: anyone who can write to a shared store can compute
it. With an integrity secret (``integrity_key_file``) a writer adds an HMAC-SHA256 over the
header and the payload (format version 2), and a reader holding the secret treats a block
without a valid MAC as a miss: a forged value, or a valid one copied under another key.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import xxhash

from lmcached.storage.base import Block, Buffer

MAGIC = b"LMCB"
FORMAT_VERSION = 1
# Version 2 is version 1 plus a MAC field (flags bit FLAG_MAC); written only with a secret, so
# readers of version 1 skip keyed blocks as "newer" instead of deleting them as corrupt.
MAC_FORMAT_VERSION = 2
MAX_READ_VERSION = MAC_FORMAT_VERSION
FLAG_MAC = 0x0001
# HMAC-SHA256 rather than keyed BLAKE2b: both are real MACs, and with the SHA extensions of
# current x86 CPUs OpenSSL's SHA-256 ran twice as fast as hashlib's BLAKE2b in one run here
# (scripts/bench_integrity.py). The MAC is the dominant cost of a keyed read.
MAC_LEN = 32

# magic, version, codec, dtype, ndim, header_len, key_len, flags, meta_len, payload_len,
# payload_xxh3_64. Little-endian, no padding: 36 bytes.
_FIXED = struct.Struct("<4sBBBBIHHIQQ")
FIXED_SIZE = _FIXED.size
_TRAILER = struct.Struct("<Q")  # xxh3-64 of every header byte before it
MAX_NDIM = 8
MAX_KEY_LEN = 0xFFFF
MAX_META_LEN = 1 << 20
# A reader that knows nothing about a file reads this many bytes first; headers are far smaller
# unless the client's metadata is large, in which case header_len says how much more to read.
HEADER_PROBE = 4096

CODECS: dict[str, int] = {"raw": 0, "zstd": 1, "lz4": 2}
DTYPES: dict[str, int] = {
    "float16": 1,
    "bfloat16": 2,
    "float32": 3,
    "float64": 4,
    "int8": 5,
    "uint8": 6,
    "int16": 7,
    "int32": 8,
    "int64": 9,
    "float8_e4m3fn": 10,
    "float8_e5m2": 11,
    "bool": 12,
    "uint16": 13,
    "uint32": 14,
}
OTHER = 255  # a codec or dtype named in the metadata that has no code of its own
_CODEC_NAMES = {v: k for k, v in CODECS.items()}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class BlockFormatError(ValueError):
    """A header or payload failed to parse or verify.

    ``kind`` is one of ``truncated``, ``bad_magic``, ``bad_header``, ``header_checksum``,
    ``checksum`` (the payload's), ``bad_meta`` (valid checksums, but the metadata is not a
    msgpack map), ``mac`` (an integrity secret is set and the block's MAC is missing or wrong)
    or ``unsupported_version`` (written by a newer lmcached: not corrupt, so readers leave it in
    place).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """The parsed header of one stored block."""

    key: bytes
    payload_len: int
    checksum: int
    header_len: int
    codec: str = "raw"
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    meta: dict[str, Any] | None = None
    version: int = FORMAT_VERSION
    mac: bytes | None = None
    # The header bytes the MAC covers (everything before the MAC field); set when ``mac`` is.
    mac_covered: bytes = b""

    @property
    def total_len(self) -> int:
        return self.header_len + self.payload_len


def payload_checksum(frames: Iterable[Buffer]) -> int:
    """Return the xxh3-64 of the concatenated frames, without concatenating them."""
    h = xxhash.xxh3_64()
    for frame in frames:
        h.update(frame)
    return h.intdigest()


def block_checksum(block: Block) -> int:
    """Return the block's checksum: the client's, when it sent one, else computed here."""
    if block.checksum is None:
        block.checksum = payload_checksum(block.frames)
    return block.checksum


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value)
    return name[len("torch.") :] if name.startswith("torch.") else name


def _mac(secret: bytes, covered: Buffer, frames: Iterable[Buffer]) -> bytes:
    h = hmac.new(secret, digestmod=hashlib.sha256)
    h.update(covered)
    for frame in frames:
        h.update(frame)
    return h.digest()


def encode_header(key: bytes, block: Block, secret: bytes | None = None) -> bytes:
    """Return the header bytes to write in front of ``block``'s payload.

    With ``secret``, the header is version 2 and carries a MAC over itself and the payload.
    Raises ValueError for a key or metadata too large for the format.
    """
    if len(key) > MAX_KEY_LEN:
        raise ValueError(f"key of {len(key)} bytes exceeds the format's {MAX_KEY_LEN}")
    meta = block.meta or None
    codec_name = str(meta.get("codec", "raw")) if meta else "raw"
    dtype_name = _dtype_name(meta.get("dtype")) if meta else None
    shape: tuple[int, ...] = ()
    if meta and isinstance(meta.get("shape"), (list, tuple)):
        raw_shape = meta["shape"]
        if len(raw_shape) <= MAX_NDIM and all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 63 for d in raw_shape
        ):
            shape = tuple(raw_shape)
    meta_bytes = msgpack.packb(meta, use_bin_type=True) if meta else b""
    if len(meta_bytes) > MAX_META_LEN:
        raise ValueError(f"block metadata of {len(meta_bytes)} bytes exceeds {MAX_META_LEN}")
    mac_len = MAC_LEN if secret is not None else 0
    header_len = FIXED_SIZE + 8 * len(shape) + len(key) + len(meta_bytes) + mac_len + _TRAILER.size
    head = b"".join(
        (
            _FIXED.pack(
                MAGIC,
                FORMAT_VERSION if secret is None else MAC_FORMAT_VERSION,
                CODECS.get(codec_name, OTHER),
                0 if dtype_name is None else DTYPES.get(dtype_name, OTHER),
                len(shape),
                header_len,
                len(key),
                0 if secret is None else FLAG_MAC,
                len(meta_bytes),
                block.nbytes,
                block_checksum(block),
            ),
            struct.pack(f"<{len(shape)}Q", *shape),
            key,
            meta_bytes,
        )
    )
    if secret is not None:
        head += _mac(secret, head, block.frames)
    return head + _TRAILER.pack(xxhash.xxh3_64_intdigest(head))


def header_length(buf: Buffer) -> int:
    """Return the full header length announced by the first FIXED_SIZE bytes of ``buf``."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes < FIXED_SIZE:
        raise BlockFormatError("truncated", f"{mv.nbytes} bytes is shorter than a block header")
    if bytes(mv[:4]) != MAGIC:
        raise BlockFormatError("bad_magic", "not an lmcached block (bad magic)")
    length: int = _FIXED.unpack_from(mv)[5]
    return length


def decode_header(buf: Buffer) -> BlockHeader:
    """Parse and verify the header at the start of ``buf`` (which may hold the payload too)."""
    mv = memoryview(buf).cast("B")
    header_len = header_length(mv)
    (_, version, codec, dtype, ndim, _, key_len, _, meta_len, payload_len, checksum) = (
        _FIXED.unpack_from(mv)
    )
    (flags,) = struct.unpack_from("<H", mv, 14)
    if version > MAX_READ_VERSION:
        raise BlockFormatError(
            "unsupported_version",
            f"block format version {version} is newer than this lmcached reads "
            f"({MAX_READ_VERSION})",
        )
    has_mac = version >= MAC_FORMAT_VERSION and bool(flags & FLAG_MAC)
    mac_len = MAC_LEN if has_mac else 0
    expected = FIXED_SIZE + 8 * ndim + key_len + meta_len + mac_len + _TRAILER.size
    if version < 1 or ndim > MAX_NDIM or header_len != expected:
        raise BlockFormatError("bad_header", f"inconsistent header (length {header_len})")
    if mv.nbytes < header_len:
        raise BlockFormatError(
            "truncated", f"header needs {header_len} bytes, only {mv.nbytes} present"
        )
    body_end = header_len - _TRAILER.size
    if _TRAILER.unpack_from(mv, body_end)[0] != xxhash.xxh3_64_intdigest(mv[:body_end]):
        raise BlockFormatError("header_checksum", "header checksum mismatch")
    pos = FIXED_SIZE
    shape = struct.unpack_from(f"<{ndim}Q", mv, pos)
    pos += 8 * ndim
    key = bytes(mv[pos : pos + key_len])
    pos += key_len
    meta = _decode_meta(mv[pos : pos + meta_len]) if meta_len else None
    pos += meta_len
    mac = bytes(mv[pos : pos + MAC_LEN]) if has_mac else None
    return BlockHeader(
        key=key,
        payload_len=payload_len,
        checksum=checksum,
        header_len=header_len,
        codec=_CODEC_NAMES.get(codec, "other"),
        dtype=_DTYPE_NAMES.get(dtype) if dtype else None,
        shape=tuple(shape),
        meta=meta,
        version=version,
        mac=mac,
        mac_covered=bytes(mv[:pos]) if has_mac else b"",
    )


def _decode_meta(raw: Buffer) -> dict[str, Any]:
    """Decode the metadata field: a msgpack map, else ``bad_meta`` (never another exception)."""
    try:
        meta = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise BlockFormatError("bad_meta", f"metadata is not valid msgpack: {exc}") from None
    if not isinstance(meta, dict):
        raise BlockFormatError("bad_meta", f"metadata is a {type(meta).__name__}, not a map")
    return meta


def decode_block(
    buf: Buffer, key: bytes | None = None, secret: bytes | None = None
) -> tuple[BlockHeader, Block]:
    """Parse ``header || payload``, verify both, and return the header and a Block viewing ``buf``.

    The Block's frame is a view into ``buf`` (no copy). Raises :class:`BlockFormatError` on any
    mismatch, including a key different from ``key`` when one is given, and (given ``secret``)
    a missing or wrong MAC.
    """
    mv = memoryview(buf).cast("B")
    header = decode_header(mv)
    if key is not None and header.key != key:
        raise BlockFormatError("bad_header", "stored block belongs to another key")
    if mv.nbytes < header.total_len:
        raise BlockFormatError(
            "truncated",
            f"payload needs {header.payload_len} bytes, only "
            f"{mv.nbytes - header.header_len} present",
        )
    if mv.nbytes > header.total_len:
        raise BlockFormatError("bad_header", "trailing bytes after the payload")
    payload = mv[header.header_len :]
    if xxhash.xxh3_64_intdigest(payload) != header.checksum:
        raise BlockFormatError("checksum", "payload checksum mismatch")
    if secret is not None:
        if header.mac is None:
            raise BlockFormatError("mac", "block carries no MAC but an integrity secret is set")
        if not hmac.compare_digest(header.mac, _mac(secret, header.mac_covered, (payload,))):
            raise BlockFormatError("mac", "block MAC does not match (forged, or another key's)")
    return header, Block(
        frames=(payload,), nbytes=header.payload_len, meta=header.meta, checksum=header.checksum
    )


def encode_block(key: bytes, block: Block, secret: bytes | None = None) -> list[Buffer]:
    """Return the pieces to write, in order: the header, then the payload frames (not copied)."""
    return [encode_header(key, block, secret), *block.frames]
