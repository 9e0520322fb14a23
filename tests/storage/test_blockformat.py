"""The block format of docs/format.md: round trips, and every kind of damage is detected."""

from __future__ import annotations

import struct

import pytest
import xxhash

from lmcached.storage.base import Block
from lmcached.storage.blockformat import (
    FIXED_SIZE,
    FORMAT_VERSION,
    MAGIC,
    BlockFormatError,
    decode_block,
    decode_header,
    encode_block,
)


def _encoded(key: bytes, payload: bytes, meta: dict | None = None) -> bytearray:
    return bytearray(b"".join(bytes(p) for p in encode_block(key, Block.from_bytes(payload, meta))))


def test_round_trip_keeps_key_payload_meta_and_typed_fields() -> None:
    meta = {"dtype": "torch.bfloat16", "shape": [2, 16, 8], "codec": "raw", "layer": 3}
    buf = _encoded(b"ns/m@0/any/ab", b"\x01\x02" * 1000, meta)
    header, block = decode_block(buf, b"ns/m@0/any/ab")
    assert header.key == b"ns/m@0/any/ab"
    assert header.dtype == "bfloat16" and header.shape == (2, 16, 8) and header.codec == "raw"
    assert header.version == FORMAT_VERSION
    assert bytes(block.frames[0]) == b"\x01\x02" * 1000
    assert block.meta == meta
    assert block.checksum == xxhash.xxh3_64_intdigest(b"\x01\x02" * 1000)


def test_fixed_part_matches_the_spec() -> None:
    buf = _encoded(b"k", b"payload")
    magic, version, codec, dtype, ndim, header_len, key_len, flags, meta_len, plen, csum = (
        struct.unpack_from("<4sBBBBIHHIQQ", buf)
    )
    assert (magic, version, codec, dtype, ndim, key_len, flags, meta_len) == (
        MAGIC,
        1,
        0,
        0,
        0,
        1,
        0,
        0,
    )
    assert plen == 7 and csum == xxhash.xxh3_64_intdigest(b"payload")
    assert header_len == FIXED_SIZE + 1 + 8 and len(buf) == header_len + 7
    # The header trailer is the xxh3-64 of every header byte before it.
    assert struct.unpack_from("<Q", buf, header_len - 8)[0] == xxhash.xxh3_64_intdigest(
        bytes(buf[: header_len - 8])
    )


def test_client_checksum_is_written_not_recomputed() -> None:
    block = Block.from_bytes(b"abc")
    block.checksum = 1234
    buf = bytearray(b"".join(bytes(p) for p in encode_block(b"k", block)))
    with pytest.raises(BlockFormatError) as err:
        decode_block(buf)
    assert err.value.kind == "checksum"


@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (lambda b: b.__setitem__(-1, b[-1] ^ 0xFF), "checksum"),
        (lambda b: b.__delitem__(slice(-3, None)), "truncated"),
        (lambda b: b.__delitem__(slice(20, None)), "truncated"),
        (lambda b: b.__setitem__(FIXED_SIZE, b[FIXED_SIZE] ^ 1), "header_checksum"),
        (lambda b: b.__setitem__(0, ord("X")), "bad_magic"),
        (lambda b: b.extend(b"junk"), "bad_header"),
    ],
)
def test_each_kind_of_damage_is_reported_as_that_kind(damage, kind: str) -> None:
    buf = _encoded(b"key", b"x" * 4096)
    damage(buf)
    with pytest.raises(BlockFormatError) as err:
        decode_block(buf)
    assert err.value.kind == kind


def test_wrong_key_is_rejected() -> None:
    with pytest.raises(BlockFormatError):
        decode_block(_encoded(b"a", b"x"), b"b")


def test_newer_version_is_reported_as_unsupported_not_corrupt() -> None:
    buf = _encoded(b"k", b"x")
    buf[4] = FORMAT_VERSION + 1
    with pytest.raises(BlockFormatError) as err:
        decode_header(buf)
    assert err.value.kind == "unsupported_version"


def test_multi_frame_block_is_checksummed_as_one_payload() -> None:
    block = Block(frames=(b"ab", memoryview(b"cd"), bytearray(b"ef")), nbytes=6)
    buf = b"".join(bytes(p) for p in encode_block(b"k", block))
    _, out = decode_block(buf)
    assert bytes(out.frames[0]) == b"abcdef"
