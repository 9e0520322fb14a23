"""Interfaces of the registry categories that are not defined by a storage module.

``storage_backend`` uses :class:`lmcached.storage.base.StorageBackend`, ``eviction_policy``
:class:`lmcached.storage.eviction.EvictionPolicy` and ``codec`` :class:`lmcached.codecs.base.Codec`.
The remote connector's interface lives here: it is the byte-level contract an external store
implements (LMCache's ``RemoteConnector``), below the remote tier's headers, checksums and
write queues.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

# Anything exposing the buffer protocol.
Buffer = Any


class RemoteConnector(ABC):
    """Store and fetch opaque byte values by key in a remote store chosen by URL scheme.

    Constructed as ``cls(url, options, context)``: ``url`` is the config's ``remote_url``,
    ``options`` the ``extra_config`` entries ``external_connector.<scheme>.<key>`` (less
    ``module_path``/``class_name``), ``context`` a
    :class:`lmcached.plugins.lifecycle.PluginContext`.
    Methods may raise; the caller counts the error and treats the operation as a miss.
    """

    @abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """Return the stored value, or None when the key is absent."""

    @abstractmethod
    def put(self, key: bytes, value: Buffer) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""

    @abstractmethod
    def exists(self, key: bytes) -> bool:
        """Return True when the key is stored."""

    @abstractmethod
    def delete(self, key: bytes) -> bool:
        """Remove the key; return True when it was present."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def iter_keys(self) -> Iterator[bytes]:
        """Iterate over stored keys; connectors that cannot list return nothing."""
        return iter(())

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [self.exists(k) for k in keys]

    def stats(self) -> Mapping[str, Any]:
        return {}
