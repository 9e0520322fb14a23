"""Build cache keys from token ids (normative spec: docs/keys.md).

A key names one chunk of ``chunk_size`` tokens *and everything before it*:

    <namespace>/<model>@<revision>/<layout>/<32 hex digits>

The hex digits are a prefix-chained xxh3-128 hash: h_0 = xxh3-128(DOMAIN), and
h_i = xxh3-128(h_{i-1} || u32le(len(extra)) || extra || tokens of chunk i as u32le).
The result depends only on the bytes above, never on PYTHONHASHSEED, the process or the host.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

DOMAIN = b"lmcached/keys/v1"
H0 = xxhash.xxh3_128_digest(DOMAIN)
_FORBIDDEN = set("/@\x00")


def _check_part(name: str, value: str) -> str:
    if not value or any(c in _FORBIDDEN for c in value) or not value.isprintable():
        raise ValueError(f"{name} {value!r} must be non-empty printable text without '/', '@'")
    return value


def tokens_le_u32(tokens: Sequence[int] | Iterable[int]) -> bytes:
    """Encode token ids as little-endian uint32 bytes; reject ids outside 0..2**32-1."""
    try:
        arr = array("I", tokens)
    except OverflowError:
        raise ValueError("token ids must be integers in 0..2**32-1") from None
    if arr.itemsize != 4:  # pragma: no cover - every CPython platform we support has 4-byte 'I'
        arr = array("L", arr)
    if sys.byteorder != "little":
        arr.byteswap()
    return arr.tobytes()


def chain_hashes(tokens: Sequence[int], chunk_size: int, extra: bytes = b"") -> list[bytes]:
    """Return the 16-byte prefix-chained hash of every whole chunk of ``tokens``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    data = tokens_le_u32(tokens)
    extra_part = len(extra).to_bytes(4, "little") + extra
    out: list[bytes] = []
    prev = H0
    step = chunk_size * 4
    for end in range(step, len(data) + 1, step):
        prev = xxhash.xxh3_128_digest(prev + extra_part + data[end - step : end])
        out.append(prev)
    return out


@dataclass(frozen=True)
class KeyBuilder:
    """Turn token sequences into daemon keys for one model, revision and KV layout."""

    namespace: str = "default"
    model: str = "model"
    revision: str = "0"
    layout: str = "any"
    chunk_size: int = 256

    def __post_init__(self) -> None:
        _check_part("namespace", self.namespace)
        _check_part("model", self.model.replace("/", "--"))
        _check_part("revision", self.revision)
        _check_part("layout", self.layout)
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive")

    @property
    def prefix(self) -> bytes:
        """The key prefix shared by every key of this builder (what `purge` takes)."""
        model = self.model.replace("/", "--")
        return f"{self.namespace}/{model}@{self.revision}/{self.layout}/".encode()

    @property
    def namespace_prefix(self) -> bytes:
        return f"{self.namespace}/".encode()

    def chunk_hashes(self, tokens: Sequence[int], extra: bytes = b"") -> list[bytes]:
        return chain_hashes(tokens, self.chunk_size, extra)

    def chunk_keys(self, tokens: Sequence[int], extra: bytes = b"") -> list[bytes]:
        """Return one key per whole chunk; a trailing partial chunk gets no key."""
        prefix = self.prefix
        return [prefix + h.hex().encode() for h in self.chunk_hashes(tokens, extra)]


def layout_tag(dtype: str, shape_class: str, tp_rank: int = 0, tp_size: int = 1) -> str:
    """Return a layout tag such as ``float16-l32h8d128-tp0of1`` for KeyBuilder.layout."""
    return f"{dtype}-{shape_class}-tp{tp_rank}of{tp_size}"
