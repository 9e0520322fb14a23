"""A lossless codec from the standard library, to show that codecs are registry entries."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

from lmcached.codecs.base import Codec


class ZlibCodec(Codec):
    """zlib at level 6."""

    name = "zlib"
    lossless = True

    def encode(self, data: Any, meta: Mapping[str, Any] | None = None) -> bytes:
        return zlib.compress(data, 6)

    def decode(self, data: Any, meta: Mapping[str, Any] | None = None) -> bytes:
        return zlib.decompress(data)
