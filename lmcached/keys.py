"""Build cache keys from token ids (normative spec: docs/keys.md, key format version 2).

A key names one chunk of ``chunk_size`` tokens *and everything before it*:

    <namespace>/<model>@<revision>/<layout>/<route>-<chunk hash>          a whole chunk
    <namespace>/<model>@<revision>/<layout>/<route>-<chunk hash>-p<n>     a trailing partial
                                                                          chunk of n tokens

The chunk hash (32 hex digits) is a prefix-chained xxh3-128 hash: h_0 = xxh3-128(DOMAIN), and
h_i = xxh3-128(h_{i-1} || u32le(len(extra)) || extra || tokens of chunk i as u32le); a trailing
partial chunk of n tokens (1 <= n < chunk_size) hashes its n tokens the same way. The route (8
hex digits) is the start of the prompt's first hash (h_1, or the partial chunk's hash for a
prompt shorter than one chunk): every key of one prompt has the same route, so the daemon
keeps a prompt's whole chain on one worker (lmcached.routing). The ``-p<n>`` suffix means a
partial chunk can never be taken for a whole one. The result depends only on the bytes above,
never on PYTHONHASHSEED, the process or the host.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import xxhash

DOMAIN = b"lmcached/keys/v1"  # the hash chain is unchanged since version 1; the key form is v2
H0 = xxhash.xxh3_128_digest(DOMAIN)
ROUTE_HEX_DIGITS = 8
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


def chain_hashes(
    tokens: Sequence[int], chunk_size: int, extra: bytes = b"", partial: bool = False
) -> list[bytes]:
    """Return the 16-byte prefix-chained hash of every whole chunk of ``tokens``.

    With ``partial``, a trailing partial chunk (``len(tokens) % chunk_size`` tokens, if any)
    gets one more hash, chained the same way.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    data = tokens_le_u32(tokens)
    extra_part = len(extra).to_bytes(4, "little") + extra
    out: list[bytes] = []
    prev = H0
    step = chunk_size * 4
    whole_end = len(data) // step * step
    for end in range(step, whole_end + 1, step):
        prev = xxhash.xxh3_128_digest(prev + extra_part + data[end - step : end])
        out.append(prev)
    if partial and whole_end < len(data):
        out.append(xxhash.xxh3_128_digest(prev + extra_part + data[whole_end:]))
    return out


@dataclass(frozen=True)
class PromptKeys:
    """The keys of one prompt: one per whole chunk, plus the trailing partial chunk's, if any."""

    whole: list[bytes]
    partial: bytes | None  # None when the prompt is a multiple of chunk_size tokens
    partial_tokens: int  # tokens in the partial chunk (0 when there is none)

    def all(self) -> list[bytes]:
        """Every key in prompt order (the partial chunk's last)."""
        return self.whole + ([self.partial] if self.partial is not None else [])


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

    def _key(self, route: str, digest: bytes, partial_tokens: int = 0) -> bytes:
        suffix = f"-p{partial_tokens}" if partial_tokens else ""
        return self.prefix + f"{route}-{digest.hex()}{suffix}".encode()

    def prompt_keys(self, tokens: Sequence[int], extra: bytes = b"") -> PromptKeys:
        """Return the keys of every whole chunk of ``tokens`` and of its trailing partial chunk."""
        hashes = chain_hashes(tokens, self.chunk_size, extra, partial=True)
        if not hashes:
            return PromptKeys([], None, 0)
        route = hashes[0].hex()[:ROUTE_HEX_DIGITS]
        rest = len(tokens) % self.chunk_size
        whole = hashes[:-1] if rest else hashes
        return PromptKeys(
            whole=[self._key(route, h) for h in whole],
            partial=self._key(route, hashes[-1], rest) if rest else None,
            partial_tokens=rest,
        )

    def chunk_keys(self, tokens: Sequence[int], extra: bytes = b"") -> list[bytes]:
        """Return one key per whole chunk (a trailing partial chunk's key: :meth:`prompt_keys`)."""
        return self.prompt_keys(tokens, extra).whole

    def partial_keys(
        self, tokens: Sequence[int], chunk: int, lengths: Iterable[int], extra: bytes = b""
    ) -> dict[int, bytes]:
        """Return the key that a partial chunk ``chunk`` of each of ``lengths`` tokens would have.

        For a prompt that extends an earlier, shorter one: the earlier prompt stored its
        trailing partial chunk under one of these keys. ``tokens`` must hold at least
        ``chunk * chunk_size + max(lengths)`` tokens.
        """
        start = chunk * self.chunk_size
        lengths = [n for n in lengths if 0 < n < self.chunk_size]
        if not lengths:
            return {}
        if start + max(lengths) > len(tokens):
            raise ValueError("partial_keys: fewer tokens than the longest partial chunk asked")
        prefix_hashes = chain_hashes(tokens[:start], self.chunk_size, extra)
        prev = prefix_hashes[-1] if prefix_hashes else H0
        extra_part = len(extra).to_bytes(4, "little") + extra
        data = tokens_le_u32(tokens[start : start + max(lengths)])
        keys = {}
        for n in lengths:
            digest = xxhash.xxh3_128_digest(prev + extra_part + data[: 4 * n])
            first = prefix_hashes[0] if prefix_hashes else digest
            keys[n] = self._key(first.hex()[:ROUTE_HEX_DIGITS], digest, n)
        return keys


def layout_tag(dtype: str, shape_class: str, tp_rank: int = 0, tp_size: int = 1) -> str:
    """Return a layout tag such as ``float16-l32h8d128-tp0of1`` for KeyBuilder.layout."""
    return f"{dtype}-{shape_class}-tp{tp_rank}of{tp_size}"
