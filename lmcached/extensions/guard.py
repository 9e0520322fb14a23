"""Hold an external remote connector to the remote tier's contract.

The remote tier (:class:`lmcached.storage.remote.RemoteBackend`) trusts its connector to raise
:class:`~lmcached.storage.remote.connector.RemoteUnavailable` when the store cannot answer, and
to return one value per key; that is what its fail-fast health and its block verification rely
on. The built-in connectors are written to that contract. An external one (a package's or an
``external_connector.<scheme>`` class) may raise anything, or answer with the wrong shape, so
:class:`GuardedConnector` turns every such failure into ``RemoteUnavailable``: the tier then
marks the remote down and fails fast until its backoff allows a retry, instead of failing the
request. It also runs the plugin lifecycle's ``on_shutdown`` at close and reports
``get_metrics()`` in the tier's stats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import structlog

from lmcached.extensions.lifecycle import OpErrors, PluginBase
from lmcached.storage.base import Buffer
from lmcached.storage.remote.connector import RemoteConnector, RemoteUnavailable

log = structlog.get_logger("lmcached.plugins")
T = TypeVar("T")


class GuardedConnector(RemoteConnector):
    """Run ``inner`` so that anything it raises, or a malformed answer, is RemoteUnavailable."""

    def __init__(self, name: str, inner: Any, class_path: str = "") -> None:
        self.name = name
        self.inner = inner
        self.class_path = class_path
        self.errors = OpErrors()
        self._closed = False

    def _failed(self, op: str, error: str) -> RemoteUnavailable:
        if self.errors.count(op) == 1:  # the first per operation in full; later ones counted
            log.error("remote connector failed", plugin=self.name, op=op, error=error)
        return RemoteUnavailable(f"connector {self.name!r} {op}: {error}")

    def _run(self, op: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RemoteUnavailable:
            raise  # already the contract's answer
        except Exception as exc:
            raise self._failed(op, f"{type(exc).__name__}: {exc}") from exc

    def _per_key(self, op: str, result: Any, n: int) -> list[Any]:
        if not isinstance(result, (list, tuple)) or len(result) != n:
            got = f"{len(result)} values" if isinstance(result, (list, tuple)) else repr(result)
            raise self._failed(op, f"returned {got} for {n} keys")
        return list(result)

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        values = self._per_key(
            "get", self._run("get", lambda: self.inner.get_many(keys)), len(keys)
        )
        for value in values:
            if value is not None and not isinstance(value, (bytes, bytearray, memoryview)):
                try:
                    memoryview(value)
                except TypeError:
                    raise self._failed(
                        "get", f"returned a {type(value).__name__}, not bytes"
                    ) from None
        return values

    def put_many(self, items: Sequence[tuple[bytes, Sequence[Buffer]]], ttl: float | None) -> None:
        self._run("put", lambda: self.inner.put_many(items, ttl))

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        found = self._run("exists", lambda: self.inner.exists_many(keys))
        return [bool(x) for x in self._per_key("exists", found, len(keys))]

    def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        gone = self._run("delete", lambda: self.inner.delete_many(keys))
        return [bool(x) for x in self._per_key("delete", gone, len(keys))]

    def scan(self, prefix: bytes) -> Iterator[bytes]:
        # Drained here, so that an error raised halfway through the iteration is guarded too.
        return iter(self._run("scan", lambda: [bytes(k) for k in self.inner.scan(prefix)]))

    def ping(self) -> None:
        self._run("ping", self.inner.ping)

    def describe(self) -> str:
        try:
            return str(self.inner.describe())
        except Exception:
            return f"{self.name} ({self.class_path or type(self.inner).__name__})"

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(self.inner, PluginBase):
            try:
                out["plugin"] = dict(self.inner.get_metrics())
            except Exception as exc:
                self._failed("get_metrics", f"{type(exc).__name__}: {exc}")
        out["plugin_errors"] = self.errors.total
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if isinstance(self.inner, PluginBase):
            try:
                self.inner.on_shutdown()
            except Exception as exc:
                self._failed("on_shutdown", f"{type(exc).__name__}: {exc}")
        try:
            self.inner.close()
        except Exception as exc:
            self._failed("close", f"{type(exc).__name__}: {exc}")
