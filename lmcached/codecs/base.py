"""The Codec interface, codec lookup through the registry, and the self-describing envelope.

Envelope layout (little-endian), written in front of every encoded payload::

    magic    4s   b"LMCC"
    version  u8   1
    name_len u8   length of the codec name
    raw_len  u64  length of the decoded payload, checked after decoding
    name     name_len bytes of ASCII: the codec's registry name
    body     the encoded bytes

The name makes a disk file or a remote value readable by any process whose registry knows the
codec, whatever the reader's own ``disk_codec``/``remote_codec`` is now: changing the setting
never makes old blocks unreadable.
"""

from __future__ import annotations

import struct
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from lmcached.errors import LMCachedError
from lmcached.extensions import sources
from lmcached.extensions.registry import (
    PluginError,
    PluginRegistry,
    PluginValidationError,
    get_registry,
)

Buffer = Any

MAGIC = b"LMCC"
ENVELOPE_VERSION = 1
_HEAD = struct.Struct("<4sBBQ")


class CodecError(LMCachedError):
    """A payload cannot be encoded or decoded (corrupt, truncated, unknown codec)."""


class Codec(ABC):
    """Turn a payload into fewer bytes and back.

    ``meta`` carries what a lossy codec needs to know about the payload (dtype, shape, the
    token axis); lossless codecs ignore it. ``decode(encode(x))`` returns exactly ``x`` when
    ``lossless`` is True.
    """

    name: str = "codec"
    lossless: bool = True

    @abstractmethod
    def encode(self, data: Buffer, meta: Mapping[str, Any] | None = None) -> bytes:
        """Return the encoded form of ``data``."""

    @abstractmethod
    def decode(self, data: Buffer, meta: Mapping[str, Any] | None = None) -> bytes:
        """Return the payload that ``encode`` was given (or, if lossy, its approximation)."""


# Built codecs by registry, then name. Weak: a registry replaced by reset_registry() takes its
# codecs along, so a name never resolves to a class the current registry no longer holds.
_CODECS: weakref.WeakKeyDictionary[PluginRegistry, dict[str, Codec]] = weakref.WeakKeyDictionary()
_CODECS_LOCK = threading.Lock()


def make_codec(name: str) -> Codec:
    """Return the codec registered as ``name`` (instances are shared; codecs are stateless).

    Raises :class:`lmcached.extensions.registry.PluginError` naming the codec when it is unknown,
    cannot be imported, or its library is missing, so a config names a bad codec at start.
    """
    registry = get_registry()
    with _CODECS_LOCK:
        codec = _CODECS.get(registry, {}).get(name)
    if codec is not None:
        return codec
    sources.load(registry)  # once per process: codecs from packages are known here too
    cls = registry.get_class("codec", name)
    try:
        codec = cls()
    except Exception as exc:
        raise PluginValidationError("codec", name, f"cannot be built: {exc}") from exc
    with _CODECS_LOCK:
        return _CODECS.setdefault(registry, {}).setdefault(name, codec)


def encode_payload(name: str, data: Buffer, meta: Mapping[str, Any] | None = None) -> bytes:
    """Encode ``data`` with the codec ``name`` and prefix the envelope naming it."""
    codec = make_codec(name)
    raw_len = memoryview(data).nbytes
    body = codec.encode(data, meta)
    tag = name.encode("ascii")
    return _HEAD.pack(MAGIC, ENVELOPE_VERSION, len(tag), raw_len) + tag + body


def codec_of(data: Buffer) -> str | None:
    """Return the codec named by an envelope, or None when ``data`` has no envelope."""
    mv = memoryview(data).cast("B")
    if mv.nbytes < _HEAD.size or bytes(mv[:4]) != MAGIC:
        return None
    _, _, name_len, _ = _HEAD.unpack_from(mv)
    return bytes(mv[_HEAD.size : _HEAD.size + name_len]).decode("ascii", "replace")


def decode_payload(
    data: Buffer, meta: Mapping[str, Any] | None = None, *, max_size: int | None = None
) -> bytes:
    """Decode an enveloped payload with the codec its header names; raise CodecError if bad.

    ``max_size`` bounds the declared decoded length, so a corrupt or hostile header cannot make
    the reader allocate without limit.
    """
    mv = memoryview(data).cast("B")
    if mv.nbytes < _HEAD.size:
        raise CodecError(f"payload of {mv.nbytes} bytes is too short for a codec header")
    magic, version, name_len, raw_len = _HEAD.unpack_from(mv)
    if magic != MAGIC:
        raise CodecError(f"payload does not start with the codec header magic {MAGIC!r}")
    if version != ENVELOPE_VERSION:
        raise CodecError(f"codec header version {version} is not supported ({ENVELOPE_VERSION})")
    if max_size is not None and raw_len > max_size:
        raise CodecError(f"codec header declares {raw_len} bytes, more than the limit {max_size}")
    start = _HEAD.size + name_len
    name = bytes(mv[_HEAD.size : start]).decode("ascii", "replace")
    try:
        codec = make_codec(name)
    except PluginError as exc:
        raise CodecError(f"payload was written with codec {name!r}, unusable here: {exc}") from exc
    try:
        out = codec.decode(mv[start:], meta)
    except CodecError:
        raise
    except Exception as exc:  # each library raises its own error type on corrupt input
        raise CodecError(f"{name}: cannot decode payload: {type(exc).__name__}: {exc}") from exc
    if codec.lossless and len(out) != raw_len:
        raise CodecError(f"{name}: decoded {len(out)} bytes, header says {raw_len}")
    return out
