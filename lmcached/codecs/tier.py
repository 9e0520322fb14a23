"""Apply a lossless codec to one storage tier (``disk_codec``, ``remote_codec``).

:class:`CodecTier` wraps any :class:`StorageBackend`: a put stores the encoded payload (a codec
envelope, which names its codec) and records in the block's metadata the codec, the raw length
and the raw payload's xxh3-64; a get decodes, checks both, and hands back the original bytes
with the client's metadata and checksum. A value that fails to decode or verify is removed,
counted and answered as a miss: never wrong bytes. The tier below sees a smaller block, so its
byte budget holds more.

Which tiers get which codec is decided by :mod:`lmcached.daemon.assembly`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import xxhash

from lmcached.codecs.base import CodecError, decode_payload, encode_payload, make_codec
from lmcached.storage.base import Block, StorageBackend, Usage

# Metadata keys this wrapper owns; stripped before a block goes back to a client.
META_CODEC = "tier_codec"
META_RAW_LEN = "tier_raw_nbytes"
META_RAW_SUM = "tier_raw_xxh3"
_OWN_KEYS = (META_CODEC, META_RAW_LEN, META_RAW_SUM)


class CodecTier(StorageBackend):
    """Encode blocks on their way into ``inner`` and decode them on their way out."""

    def __init__(self, inner: StorageBackend, codec: str) -> None:
        make_codec(codec)  # unknown or unusable codecs fail here, at start
        self.inner = inner
        self.codec = codec
        self.name = inner.name
        self.raw_bytes = 0
        self.encoded_bytes = 0
        self.decode_failures = 0
        self._closed = False

    def __getattr__(self, attr: str) -> Any:
        # Tier-specific extras (a disk tier's check(), say) stay reachable through the wrapper.
        if attr == "inner":  # not set yet (during __init__): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def put(self, key: bytes, block: Block) -> bool:
        # One copy joins the frames: the codec needs one contiguous input.
        raw = block.tobytes()
        meta = dict(block.meta or {})
        meta[META_CODEC] = self.codec
        meta[META_RAW_LEN] = block.nbytes
        meta[META_RAW_SUM] = (
            block.checksum if block.checksum is not None else xxhash.xxh3_64_intdigest(raw)
        )
        encoded = encode_payload(self.codec, raw)
        if not self.inner.put(key, Block.from_bytes(encoded, meta)):
            return False
        self.raw_bytes += block.nbytes
        self.encoded_bytes += len(encoded)
        return True

    def _decode(self, key: bytes, block: Block | None) -> Block | None:
        if block is None:
            return None
        meta = dict(block.meta or {})
        if META_CODEC not in meta:
            return block  # written before a codec was configured: stored as it came
        raw_len = meta.pop(META_RAW_LEN, None)
        raw_sum = meta.pop(META_RAW_SUM, None)
        meta.pop(META_CODEC, None)
        try:
            raw = decode_payload(block.tobytes(), max_size=raw_len)
            if len(raw) != raw_len or xxhash.xxh3_64_intdigest(raw) != raw_sum:
                raise CodecError("decoded payload does not match its recorded length/checksum")
        except CodecError:
            self.decode_failures += 1
            self.inner.remove(key)
            return None
        return Block.from_bytes(raw, meta or None, checksum=raw_sum)

    def get(self, key: bytes) -> Block | None:
        return self._decode(key, self.inner.get(key))

    def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        return [self._decode(k, b) for k, b in zip(keys, self.inner.get_many(keys), strict=True)]

    def contains(self, key: bytes) -> bool:
        return self.inner.contains(key)

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return self.inner.contains_many(keys)

    def remove(self, key: bytes) -> bool:
        return self.inner.remove(key)

    def remove_prefix(self, prefix: bytes) -> int:
        return self.inner.remove_prefix(prefix)

    # Forwarded so the inner tier's batching and ownership rules hold (a remote tier lists only
    # the keys its worker owns, so a purge fanned out to every worker counts each key once).
    def remove_many(self, keys: Sequence[bytes]) -> list[bool]:
        return self.inner.remove_many(keys)

    def keys_with_prefix(self, prefix: bytes) -> list[bytes]:
        return self.inner.keys_with_prefix(prefix)

    def iter_keys(self) -> Iterator[bytes]:
        return self.inner.iter_keys()

    def usage(self) -> Usage:
        return self.inner.usage()

    def stats(self) -> dict[str, Any]:
        out = dict(self.inner.stats())
        out["codec"] = self.codec
        out["codec_raw_bytes"] = self.raw_bytes
        out["codec_encoded_bytes"] = self.encoded_bytes
        out["codec_decode_failures"] = self.decode_failures
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.inner.close()
