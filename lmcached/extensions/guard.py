"""Hold external plugin objects to their tier's contract: a failure is counted and answered.

An external storage backend or remote connector (a package's, or one named in the config) may
raise anything at run time, or answer with the wrong shape. One :class:`PluginGuard` per wrapped
object runs each call, counts failures per operation (:class:`OpErrors`), logs the first one of
each operation in full, runs the lifecycle's ``get_metrics()`` and ``on_shutdown()`` and closes
the object once. The two wrappers differ only in how a failure is answered:

- :class:`GuardedBackend` (a TieredStore tier): as a miss, i.e. the tier's "not here" value
  (None, False or nothing), never a failed request.
- :class:`GuardedConnector` (behind the remote tier): as
  :class:`~lmcached.storage.remote.connector.RemoteUnavailable`, the contract the remote tier's
  fail-fast health and block verification rely on; the tier then marks the remote down and
  fails fast until its backoff allows a retry.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import structlog

from lmcached.extensions.lifecycle import PluginBase
from lmcached.storage.base import Block, Buffer, StorageBackend, Usage
from lmcached.storage.remote.connector import RemoteConnector, RemoteUnavailable, ValueTooLarge

log = structlog.get_logger("lmcached.plugins")
T = TypeVar("T")


class OpErrors:
    """Count a plugin's failures per operation (thread-safe), for logs and stats."""

    def __init__(self) -> None:
        self._by_op: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, op: str) -> int:
        """Record one failure of ``op``; return how many there have been (1 = the first)."""
        with self._lock:
            n = self._by_op.get(op, 0) + 1
            self._by_op[op] = n
            return n

    def __getitem__(self, op: str) -> int:
        with self._lock:
            return self._by_op.get(op, 0)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._by_op.values())


def describe_error(exc: BaseException) -> str:
    """Return ``Type: message``, the form every guard logs and reports."""
    return f"{type(exc).__name__}: {exc}"


class PluginGuard:
    """Run calls into one plugin object so that a failure is counted, logged once per op, answered.

    ``event`` is the log line of a failure (with ``plugin``, ``op`` and ``error`` fields).
    """

    def __init__(self, name: str, inner: Any, event: str) -> None:
        self.name = name
        self.inner = inner
        self.event = event
        self.errors = OpErrors()
        self._closed = False

    def failed(self, op: str, error: str) -> None:
        """Count a failure of ``op``; the first one per operation is logged in full."""
        if self.errors.count(op) == 1:
            log.error(self.event, plugin=self.name, op=op, error=error)

    def call(
        self,
        op: str,
        fn: Callable[[], T],
        answer: Callable[[str], T],
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Return ``fn()``; when it raises, count the failure and return ``answer(error)``.

        Exceptions in ``passthrough`` are already the contract's answer and propagate as they
        are, uncounted.
        """
        try:
            return fn()
        except passthrough:
            raise
        except Exception as exc:
            error = describe_error(exc)
            self.failed(op, error)
            return answer(error)

    def plugin_metrics(self) -> dict[str, Any] | None:
        """Return the plugin's ``get_metrics()`` (None when it has no lifecycle or it raised)."""
        if not isinstance(self.inner, PluginBase):
            return None
        try:
            return dict(self.inner.get_metrics())
        except Exception as exc:
            self.failed("get_metrics", describe_error(exc))
            return None

    def close(self) -> None:
        """Run ``on_shutdown()`` (lifecycle plugins) and ``close()``, each failure counted. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if isinstance(self.inner, PluginBase):
            try:
                self.inner.on_shutdown()
            except Exception as exc:
                self.failed("on_shutdown", describe_error(exc))
        try:
            self.inner.close()
        except Exception as exc:
            self.failed("close", describe_error(exc))


class GuardedBackend(StorageBackend):
    """Run an external backend so that its failures are misses, counted, never request errors."""

    def __init__(self, name: str, inner: StorageBackend, entry_class: str = "") -> None:
        self.name = name
        self.inner = inner
        self.entry_class = entry_class
        self.guard = PluginGuard(name, inner, "plugin backend raised; answering as a miss")
        self.errors = self.guard.errors

    def contains(self, key: bytes) -> bool:
        return self.guard.call("contains", lambda: bool(self.inner.contains(key)), _false)

    def get(self, key: bytes) -> Block | None:
        block = self.guard.call("get", lambda: self.inner.get(key), _none)
        if block is not None and not isinstance(block, Block):
            self.guard.failed("get", f"TypeError: returned {type(block).__name__}, not a Block")
            return None
        return block

    def put(self, key: bytes, block: Block) -> bool:
        return self.guard.call("put", lambda: bool(self.inner.put(key, block)), _false)

    def remove(self, key: bytes) -> bool:
        return self.guard.call("remove", lambda: bool(self.inner.remove(key)), _false)

    def iter_keys(self) -> Iterator[bytes]:
        # Listed here, so that an error raised halfway through the iteration is guarded too.
        keys = self.guard.call("iter_keys", lambda: list(self.inner.iter_keys()), _empty)
        return iter(keys)

    def usage(self) -> Usage:
        return self.guard.call(
            "usage",
            self.inner.usage,
            lambda _: Usage(used_bytes=0, capacity_bytes=0, entries=0),
        )

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        return self.guard.call(
            "contains",
            lambda: [bool(x) for x in self.inner.contains_many(keys)],
            lambda _: [False] * len(keys),
        )

    def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, Block]]) -> list[bool]:
        return [self.put(k, b) for k, b in items]

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.guard.call("stats", self.inner.stats, _empty_dict))
        metrics = self.guard.plugin_metrics()
        if metrics is not None:
            out["plugin"] = metrics
        # Counted last, so a failure of the two calls above is included.
        out["plugin_errors"] = self.errors.total
        # Also in the generic tier counter, so the metrics endpoint's lmcached_tier_errors
        # counts them under the plugin's name without knowing about plugins.
        out["errors"] = int(out.get("errors", 0) or 0) + out["plugin_errors"]
        return out

    def close(self) -> None:
        self.guard.close()


class GuardedConnector(RemoteConnector):
    """Run ``inner`` so that anything it raises, or a malformed answer, is RemoteUnavailable."""

    def __init__(self, name: str, inner: Any, class_path: str = "") -> None:
        self.name = name
        self.inner = inner
        self.class_path = class_path
        self.guard = PluginGuard(name, inner, "remote connector failed")
        self.errors = self.guard.errors

    def _unavailable(self, op: str, error: str) -> RemoteUnavailable:
        return RemoteUnavailable(f"connector {self.name!r} {op}: {error}")

    def _failed(self, op: str, error: str) -> RemoteUnavailable:
        self.guard.failed(op, error)
        return self._unavailable(op, error)

    def _run(self, op: str, fn: Callable[[], T]) -> T:
        def answer(error: str) -> T:
            raise self._unavailable(op, error)

        return self.guard.call(op, fn, answer, passthrough=(RemoteUnavailable,))

    def _per_key(self, op: str, result: Any, n: int) -> list[Any]:
        if not isinstance(result, (list, tuple)) or len(result) != n:
            got = f"{len(result)} values" if isinstance(result, (list, tuple)) else repr(result)
            raise self._failed(op, f"returned {got} for {n} keys")
        return list(result)

    @property
    def max_value_bytes(self) -> int | None:
        return getattr(self.inner, "max_value_bytes", None)

    @max_value_bytes.setter
    def max_value_bytes(self, value: int | None) -> None:
        # Handed to the connector that reads, so a capped read happens where the bytes arrive.
        # A connector with slots and no such field reads uncapped, as before.
        with contextlib.suppress(AttributeError):
            self.inner.max_value_bytes = value

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | ValueTooLarge | None]:
        values = self._per_key(
            "get", self._run("get", lambda: self.inner.get_many(keys)), len(keys)
        )
        for value in values:
            if value is not None and not isinstance(
                value, (bytes, bytearray, memoryview, ValueTooLarge)
            ):
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
        metrics = self.guard.plugin_metrics()
        if metrics is not None:
            out["plugin"] = metrics
        out["plugin_errors"] = self.errors.total
        return out

    def close(self) -> None:
        self.guard.close()


def _false(_error: str) -> bool:
    return False


def _none(_error: str) -> None:
    return None


def _empty(_error: str) -> list[Any]:
    return []


def _empty_dict(_error: str) -> dict[str, Any]:
    return {}
