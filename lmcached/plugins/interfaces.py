"""The interface of the ``remote_connector`` category.

``storage_backend`` uses :class:`lmcached.storage.base.StorageBackend`, ``eviction_policy``
:class:`lmcached.storage.eviction.EvictionPolicy` and ``codec`` :class:`lmcached.codecs.base.Codec`.
A remote connector is the byte-level contract of the remote tier (LMCache's
``RemoteConnector``): batched raw values in and out of one shared store, below the tier's block
format, checksums and write queues. The tiers module defines it
(``lmcached.storage.remote.connector``); until that module is present this file carries the same
interface, so external connectors are written against one shape either way.

External connectors are built as ``cls(url, timeout=seconds, options=dict, context=ctx)``:
``options`` are the ``extra_config`` keys ``external_connector.<scheme>.<option>`` (less
``module_path`` and ``class_name``), ``context`` a :class:`lmcached.plugins.lifecycle.PluginContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

Buffer = Any

try:  # the tiers' definition, once present, is the one interface
    from lmcached.storage.remote.connector import RemoteConnector  # type: ignore[import-not-found]
except ImportError:

    class RemoteConnector(ABC):  # type: ignore[no-redef]
        """Move raw values (already-encoded blocks) to and from one shared store."""

        @abstractmethod
        def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
            """Return each key's value, or None where it is absent."""

        @abstractmethod
        def put_many(
            self, items: Sequence[tuple[bytes, Sequence[Buffer]]], ttl: float | None
        ) -> None:
            """Store each key's value, given as pieces to concatenate; expire after ``ttl`` s."""

        @abstractmethod
        def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
            """Return whether each key is present."""

        @abstractmethod
        def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
            """Delete the keys; return, per key, whether it existed."""

        @abstractmethod
        def scan(self, prefix: bytes) -> Iterator[bytes]:
            """Iterate over the stored keys that start with ``prefix``."""

        @abstractmethod
        def ping(self) -> None:
            """Round-trip to the store; raise when it does not answer."""

        @abstractmethod
        def close(self) -> None:
            """Release connections. Idempotent."""

        def describe(self) -> str:
            """Return where this connector points, without secrets (for status)."""
            return type(self).__name__


__all__ = ["RemoteConnector"]
