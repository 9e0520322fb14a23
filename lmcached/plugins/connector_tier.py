"""A storage tier over a registry remote connector, with the tier's codec applied.

This is the bridge that lets a connector chosen by ``remote_url``'s scheme (an external one
such as ``folder://`` from plugin_examples, declared with ``external_connector.<scheme>.*``)
serve as the remote tier of the TieredStore. Values are stored as codec envelopes
(:func:`lmcached.codecs.base.encode_payload`), so each value names its codec; a connector
failure is counted and answered as a miss, like any guarded plugin.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import structlog

from lmcached.codecs.base import CodecError, decode_payload, encode_payload
from lmcached.plugins.interfaces import RemoteConnector
from lmcached.plugins.lifecycle import PluginBase
from lmcached.storage.base import Block, StorageBackend, TierStats, Usage

log = structlog.get_logger("lmcached.plugins")


class ConnectorBackend(StorageBackend):
    """Serve a RemoteConnector as a tier; encode with ``codec`` (None: the 'none' codec)."""

    def __init__(
        self,
        connector: RemoteConnector,
        *,
        name: str = "remote",
        codec: str | None = None,
        max_block_size: int | None = None,
    ) -> None:
        self.name = name
        self.connector = connector
        self.codec = codec or "none"
        self.max_block_size = max_block_size
        self.counters = TierStats()
        self._lock = threading.Lock()
        self._closed = False

    def _error(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self.counters.errors += 1
            first = self.counters.errors == 1
        if first:
            log.error(
                "remote connector raised; answering as a miss",
                tier=self.name,
                op=op,
                error=f"{type(exc).__name__}: {exc}",
            )

    def contains(self, key: bytes) -> bool:
        try:
            return bool(self.connector.exists_many([key])[0])
        except Exception as exc:
            self._error("exists", exc)
            return False

    def get(self, key: bytes) -> Block | None:
        try:
            value = self.connector.get_many([key])[0]
        except Exception as exc:
            self._error("get", exc)
            value = None
        if value is None:
            self.counters.misses += 1
            return None
        try:
            payload = decode_payload(value, max_size=self.max_block_size)
        except CodecError as exc:
            # Never return wrong bytes: drop the value and answer a miss.
            extra = self.counters.extra
            extra["decode_failures"] = extra.get("decode_failures", 0) + 1
            log.warning("dropping undecodable remote value", tier=self.name, error=str(exc))
            self.remove(key)
            self.counters.misses += 1
            return None
        self.counters.hits += 1
        self.counters.bytes_read += len(payload)
        return Block.from_bytes(payload)

    def put(self, key: bytes, block: Block) -> bool:
        # One copy to join the frames: every codec, 'none' included, needs one contiguous input.
        value = encode_payload(self.codec, block.tobytes())
        try:
            self.connector.put_many([(key, [value])], None)
        except Exception as exc:
            self._error("put", exc)
            return False
        self.counters.puts += 1
        self.counters.bytes_stored += len(value)
        return True

    def remove(self, key: bytes) -> bool:
        try:
            return bool(self.connector.delete_many([key])[0])
        except Exception as exc:
            self._error("delete", exc)
            return False

    def iter_keys(self) -> Iterator[bytes]:
        try:
            return iter(list(self.connector.scan(b"")))
        except Exception as exc:
            self._error("iter_keys", exc)
            return iter(())

    def usage(self) -> Usage:
        return Usage(used_bytes=self.counters.bytes_stored, capacity_bytes=0, entries=0)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.counters.as_dict(), "codec": self.codec}
        if isinstance(self.connector, PluginBase):
            try:
                out["plugin"] = dict(self.connector.get_metrics())
            except Exception as exc:
                self._error("get_metrics", exc)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if isinstance(self.connector, PluginBase):
            try:
                self.connector.on_shutdown()
            except Exception as exc:
                self._error("on_shutdown", exc)
        try:
            self.connector.close()
        except Exception as exc:
            self._error("close", exc)
