"""The RemoteConnector interface and the table that picks a connector by URL scheme."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from urllib.parse import urlsplit

from lmcached.storage.base import Buffer


class RemoteUnavailable(Exception):
    """The remote store did not answer in time, or the connection failed (transient)."""


class RemoteConnector(ABC):
    """Move raw values (already-encoded blocks) to and from one shared store.

    Every method is bounded by the connector's timeout and raises :class:`RemoteUnavailable`
    for connection failures and timeouts; anything else is a bug or a bad request.
    """

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        """Return each key's value, or None where it is absent."""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, Sequence[Buffer]]], ttl: float | None) -> None:
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
        """Round-trip to the store; raise RemoteUnavailable when it does not answer."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    def describe(self) -> str:
        """Return where this connector points, without secrets (for status)."""
        return type(self).__name__


ConnectorFactory = Callable[..., RemoteConnector]

# scheme -> "module:factory". Built-ins are imported only when their scheme is used; the
# extensions registry adds external connectors (LMCache's external_connector.<scheme>) here.
CONNECTORS: dict[str, str | ConnectorFactory] = {
    "redis": "lmcached.storage.remote.redis_connector:RedisConnector",
    "rediss": "lmcached.storage.remote.redis_connector:RedisConnector",
    "unix": "lmcached.storage.remote.redis_connector:RedisConnector",
    "redis+cluster": "lmcached.storage.remote.redis_connector:RedisClusterConnector",
    "rediss+cluster": "lmcached.storage.remote.redis_connector:RedisClusterConnector",
    "fs": "lmcached.storage.remote.fs_connector:FSConnector",
}


def connector_factory(url: str) -> ConnectorFactory:
    """Return the factory for ``url``'s scheme; raise ValueError naming the known schemes."""
    scheme = urlsplit(url).scheme.lower()
    entry = CONNECTORS.get(scheme)
    if entry is None:
        raise ValueError(
            f"no remote connector for scheme {scheme!r} in {url!r}; "
            f"known: {', '.join(sorted(CONNECTORS))}"
        )
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module), attr)
    return entry


def make_connector(url: str, *, timeout: float) -> RemoteConnector:
    """Build the connector for ``url``; every operation it runs is bounded by ``timeout``."""
    return connector_factory(url)(url, timeout=timeout)
