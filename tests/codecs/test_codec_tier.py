"""A codec applied to a tier: smaller blocks below, the original bytes, meta and checksum above."""

from __future__ import annotations

import xxhash

from lmcached.codecs.base import codec_of
from lmcached.codecs.tier import CodecTier
from lmcached.storage.base import Block
from lmcached.storage.cpu import CPUBackend

PAYLOAD = (b"layer0-k " * 30_000)[: 256 * 1024]


def test_codec_tier_round_trips_and_stores_less():
    inner = CPUBackend(1 << 20)
    tier = CodecTier(inner, "zstd")
    meta = {"dtype": "bfloat16", "codec": "client-owned"}
    assert tier.put(
        b"k", Block.from_bytes(PAYLOAD, meta, checksum=xxhash.xxh3_64_intdigest(PAYLOAD))
    )
    stored = inner.get(b"k")
    assert codec_of(stored.tobytes()) == "zstd" and stored.nbytes < len(PAYLOAD) // 10
    out = tier.get(b"k")
    assert out.tobytes() == PAYLOAD
    assert out.meta == meta  # the client's metadata, its own "codec" key included
    assert out.checksum == xxhash.xxh3_64_intdigest(PAYLOAD)
    stats = tier.stats()
    assert stats["codec"] == "zstd" and stats["codec_raw_bytes"] == len(PAYLOAD)
    assert stats["codec_encoded_bytes"] == stored.nbytes
    tier.close()
    tier.close()


def test_a_value_that_does_not_decode_is_a_counted_miss_and_is_removed():
    inner = CPUBackend(1 << 20)
    tier = CodecTier(inner, "lz4")
    tier.put(b"k", Block.from_bytes(PAYLOAD))
    good = inner.get(b"k")
    corrupt = bytearray(good.tobytes())
    corrupt[-10:] = b"\xff" * 10
    inner.put(b"k", Block.from_bytes(bytes(corrupt), good.meta))
    assert tier.get(b"k") is None
    assert tier.stats()["codec_decode_failures"] == 1
    assert not inner.contains(b"k")
    # A wrong recorded checksum is caught too, even when the codec decodes fine.
    tier.put(b"k2", Block.from_bytes(PAYLOAD, checksum=12345))
    assert tier.get_many([b"k2"]) == [None]


def test_blocks_written_before_the_codec_was_set_still_read():
    inner = CPUBackend(1 << 20)
    inner.put(b"old", Block.from_bytes(b"plain"))
    assert CodecTier(inner, "zstd").get(b"old").tobytes() == b"plain"
