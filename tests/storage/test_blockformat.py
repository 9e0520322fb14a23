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
    MAX_READ_VERSION,
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
    buf[4] = MAX_READ_VERSION + 1
    with pytest.raises(BlockFormatError) as err:
        decode_header(buf)
    assert err.value.kind == "unsupported_version"


def test_multi_frame_block_is_checksummed_as_one_payload() -> None:
    block = Block(frames=(b"ab", memoryview(b"cd"), bytearray(b"ef")), nbytes=6)
    buf = b"".join(bytes(p) for p in encode_block(b"k", block))
    _, out = decode_block(buf)
    assert bytes(out.frames[0]) == b"abcdef"


SECRET = b"s" * 32


def _keyed(key: bytes, payload: bytes, secret: bytes = SECRET) -> bytes:
    block = Block.from_bytes(payload, {"a": 1})
    return b"".join(bytes(p) for p in encode_block(key, block, secret))


def test_keyed_block_verifies_with_its_secret_and_readers_without_one() -> None:
    buf = _keyed(b"k", b"payload")
    header, block = decode_block(buf, b"k", SECRET)
    assert header.version == 2 and header.mac is not None and block.tobytes() == b"payload"
    _, plain = decode_block(buf, b"k")  # no secret configured: the checksums still hold
    assert plain.tobytes() == b"payload" and plain.meta == {"a": 1}


def test_forged_block_without_the_secret_is_a_mac_failure() -> None:
    unkeyed = b"".join(bytes(p) for p in encode_block(b"k", Block.from_bytes(b"evil")))
    with pytest.raises(BlockFormatError) as err:
        decode_block(unkeyed, b"k", SECRET)
    assert err.value.kind == "mac"
    wrong_secret = _keyed(b"k", b"evil", b"w" * 32)
    with pytest.raises(BlockFormatError) as err:
        decode_block(wrong_secret, b"k", SECRET)
    assert err.value.kind == "mac"


def test_keyed_block_copied_under_another_key_is_a_mac_failure() -> None:
    # Rewrite the key in the header (same length) and fix up the unkeyed trailer, as a writer
    # without the secret can: the MAC still names the original key.

    buf = bytearray(_keyed(b"victim-key", b"payload"))
    pos = buf.index(b"victim-key")
    buf[pos : pos + 10] = b"attack-key"
    header_len = int.from_bytes(buf[8:12], "little")
    buf[header_len - 8 : header_len] = xxhash.xxh3_64_intdigest(
        bytes(buf[: header_len - 8])
    ).to_bytes(8, "little")
    with pytest.raises(BlockFormatError) as err:
        decode_block(bytes(buf), b"attack-key", SECRET)
    assert err.value.kind == "mac"


@pytest.mark.parametrize("meta_bytes", [b"\x07", b"\xc1", b"\x92\x01"])
def test_undecodable_or_non_map_meta_is_bad_meta(meta_bytes: bytes) -> None:
    # A valid header checksum over metadata that is not a msgpack map (7, a reserved byte, a
    # list): a BlockFormatError the tiers turn into a miss, never another exception.

    good = _encoded(b"k", b"x")
    fixed = bytearray(good[:36])
    struct.pack_into("<I", fixed, 16, len(meta_bytes))
    header_len = 36 + 1 + len(meta_bytes) + 8
    struct.pack_into("<I", fixed, 8, header_len)
    head = bytes(fixed) + b"k" + meta_bytes
    buf = head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little") + b"x"
    with pytest.raises(BlockFormatError) as err:
        decode_block(buf, b"k")
    assert err.value.kind == "bad_meta"
