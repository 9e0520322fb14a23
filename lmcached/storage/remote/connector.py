"""The RemoteConnector interface, and building the connector registered for a URL's scheme."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from lmcached.extensions.registry import PluginNotFoundError, get_registry
from lmcached.storage.base import Buffer


class RemoteUnavailable(Exception):
    """The remote store did not answer in time, or the connection failed (transient)."""


class ValueTooLarge:
    """Returned by ``get_many`` in place of a value larger than ``max_value_bytes`` (unread)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __str__(self) -> str:
        return self.message


class RemoteConnector(ABC):
    """Move raw values (already-encoded blocks) to and from one shared store.

    Every method is bounded by the connector's timeout and raises :class:`RemoteUnavailable`
    for connection failures and timeouts; anything else is a bug or a bad request.

    ``max_value_bytes`` (set by the RemoteBackend; None: no cap) bounds what ``get_many`` may
    read for one value: a larger one is returned as a :class:`ValueTooLarge`, having read at
    most about that many bytes, so a value planted by another writer cannot exhaust memory.
    """

    max_value_bytes: int | None = None

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | ValueTooLarge | None]:
        """Return each key's value, or None where it is absent (see ``max_value_bytes``)."""

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

    def stats(self) -> dict[str, Any]:
        """Return connector-specific numbers, merged into the remote tier's stats."""
        return {}


def make_connector(url: str, *, timeout: float) -> RemoteConnector:
    """Build the connector registered for ``url``'s scheme; each operation is bounded by ``timeout``.

    The scheme is looked up in the plugin registry (``remote_connector`` category), where the
    built-in schemes are entries like any package's, so an external package can take one over
    by priority. The class is built as ``cls(url, timeout=...)``, without plugin options or
    lifecycle: :func:`lmcached.daemon.assembly.build_remote_connector` adds those for the
    daemon. Raises ValueError naming the registered schemes for an unknown one.
    """
    registry = get_registry()
    scheme = urlsplit(url).scheme.lower()
    try:
        cls = registry.get_class("remote_connector", scheme)
    except PluginNotFoundError:
        raise ValueError(
            f"no remote connector for scheme {scheme!r} in {url!r}; "
            f"registered: {', '.join(registry.names('remote_connector'))}"
        ) from None
    connector: RemoteConnector = cls(url, timeout=timeout)
    return connector
