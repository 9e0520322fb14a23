"""Redis connectors: one server (redis://, rediss://, unix://, valkey://), Redis Cluster and
Redis Sentinel.

Both use redis-py with the hiredis parser. Batches go out as one pipeline (no MULTI), so a batch
costs one round trip. redis-py's own retries are switched off: the RemoteBackend decides when to
try again (fail fast, then reconnect with backoff), so a dead Redis costs at most one timeout.

Cluster URLs list the seed nodes, comma-separated::

    redis+cluster://[user:password@]host1:port1,host2:port2[,...][?opt=value]
    rediss+cluster://...   (the same over TLS)
    redis-cluster://...    (LMCache's spelling of redis+cluster://)

Sentinel URLs (LMCache's form) list the sentinels; the master's service name is the path, else
``REDIS_SERVICE_NAME`` (as LMCache reads it), else LMCache's default ``redismaster``::

    redis-sentinel://[user:password@]sentinel1:26379,sentinel2:26379[/service_name]

``valkey://`` is redis:// under Valkey's name (the same protocol).
"""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from lmcached.config import parse_cluster_url, redact_url
from lmcached.storage.base import Buffer
from lmcached.storage.remote.connector import RemoteConnector, RemoteUnavailable, ValueTooLarge

T = TypeVar("T")

# Errors that mean "the store is unreachable or unhealthy right now", as opposed to a bad request.
TRANSIENT = (
    rexc.ConnectionError,  # includes redis.exceptions.TimeoutError's sibling and auth failures
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.ClusterDownError,
    rexc.ClusterError,
    rexc.MasterDownError,
    rexc.TryAgainError,
    rexc.SlotNotCoveredError,
    rexc.MaxConnectionsError,
    rexc.RedisClusterException,
    OSError,
)

_GLOB_SPECIAL = frozenset(b"*?[]\\")


def glob_escape(prefix: bytes) -> bytes:
    """Escape ``prefix`` for a Redis MATCH pattern, so keys with * or [ match literally."""
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIAL else bytes([c]) for c in prefix)


def _drop_frames(exc: BaseException) -> None:
    """Clear the local variables of the finished frames in ``exc``'s tracebacks.

    A failed redis-py pipeline raises the first error of its replies list, and that list, held
    by the pipeline's frame, holds the error: exception -> traceback -> frame -> list ->
    exception, a cycle that only the cyclic GC frees. Until its (rare) full collection, the
    frames keep the whole batch alive: blocks, joined values and packed commands, ~6 MiB per
    batch of 32 x 64 KiB. A full Redis (maxmemory, noeviction) fails every batch, so a worker's
    heap grew by tens of MiB, kept by malloc afterwards. Cleared frames break the cycle and
    the batch is freed as soon as the caller drops the error.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # skips frames still running (ours)
        todo += (e.__cause__, e.__context__)


def _join(pieces: Sequence[Buffer]) -> Buffer:
    # A Redis value is one argument; the header and payload frames are joined here (one copy,
    # a few ms for 32 MiB against a ~70 ms SET).
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class _RedisBase(RemoteConnector):
    def __init__(self, url: str, *, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._closed = False

    # Whether a failed call drops the client, so that the next call builds a new one: set where
    # the client caches where to go (a cluster's slot map, a sentinel group's master).
    _rebuild_after_failure = False

    def _make_client(self) -> Any:
        raise NotImplementedError

    def _call(self, fn: Callable[[Any], T]) -> T:
        if self._closed:
            raise RemoteUnavailable("connector is closed")
        try:
            client = self._client
            if client is None:
                with self._client_lock:
                    if self._client is None:
                        self._client = self._make_client()
                    client = self._client
            return fn(client)
        except TRANSIENT as exc:
            _drop_frames(exc)
            if self._rebuild_after_failure:
                self._drop_client()
            raise RemoteUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            _drop_frames(exc)
            raise

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | ValueTooLarge | None]:
        cap = self.max_value_bytes
        if cap is None:
            if len(keys) == 1:
                return [self._call(lambda c: c.get(keys[0]))]

            def run(c: Any) -> list[Buffer | None]:
                pipe = c.pipeline(transaction=False)
                for k in keys:
                    pipe.get(k)
                return list(pipe.execute())

            return self._call(run)

        # GETRANGE 0..cap returns at most cap + 1 bytes, so a planted huge value costs at most
        # that much to read; it costs the same as GET otherwise. A missing key reads as b""
        # (never a valid block: a header alone is longer).
        def run_capped(c: Any) -> list[Buffer | ValueTooLarge | None]:
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.getrange(k, 0, cap)
            out: list[Buffer | ValueTooLarge | None] = []
            for v in pipe.execute():
                if not v:
                    out.append(None)
                elif len(v) > cap:
                    out.append(ValueTooLarge(f"value of more than {cap} bytes"))
                else:
                    out.append(v)
            return out

        return self._call(run_capped)

    def put_many(self, items: Sequence[tuple[bytes, Sequence[Buffer]]], ttl: float | None) -> None:
        px = max(1, int(ttl * 1000)) if ttl else None
        if len(items) == 1:
            key, pieces = items[0]
            self._call(lambda c: c.set(key, _join(pieces), px=px))
            return

        def run(c: Any) -> None:
            pipe = c.pipeline(transaction=False)
            for key, pieces in items:
                pipe.set(key, _join(pieces), px=px)
            pipe.execute()

        self._call(run)

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        def run(c: Any) -> list[bool]:
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            return [bool(n) for n in pipe.execute()]

        return self._call(run)

    def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []

        # One DEL per key: in a cluster the keys live in different slots (no CROSSSLOT error),
        # and the replies say which keys existed.
        def run(c: Any) -> list[bool]:
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.delete(k)
            return [bool(n) for n in pipe.execute()]

        return self._call(run)

    def scan(self, prefix: bytes) -> Iterator[bytes]:
        pattern = glob_escape(prefix) + b"*"
        keys = self._call(lambda c: list(c.scan_iter(match=pattern, count=1000)))
        return iter(keys)

    def ping(self) -> None:
        self._call(lambda c: c.ping())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_client()

    def describe(self) -> str:
        return redact_url(self.url)


class RedisConnector(_RedisBase):
    """One Redis server: ``redis://host:port/db``, ``rediss://`` (TLS), ``unix:///path.sock``."""

    def _make_client(self) -> Any:
        url = self.url
        if url.lower().startswith("valkey"):
            # valkey:// and valkeys:// speak RESP like redis:// and rediss://.
            url = "redis" + url[len("valkey") :]
        return redis.Redis.from_url(
            url,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )


class RedisClusterConnector(_RedisBase):
    """Redis Cluster: ``redis+cluster://host1:port1,host2:port2`` (seed nodes; TLS: rediss+)."""

    # The slot map may be stale after a failure (a node moved or restarted): rebuild it.
    _rebuild_after_failure = True

    def __init__(self, url: str, *, timeout: float) -> None:
        super().__init__(url, timeout=timeout)
        self.nodes, self.options = parse_cluster_url(url)  # bad URLs fail at start, not later

    def _make_client(self) -> Any:
        # Connecting reads the slot map, so it is done lazily: a cluster that is down at start
        # only makes the remote tier unhealthy, it does not stop the worker.
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self.nodes],
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            require_full_coverage=True,
            **self.options,
        )


DEFAULT_SENTINEL_SERVICE = "redismaster"  # LMCache's default when REDIS_SERVICE_NAME is unset


class RedisSentinelConnector(_RedisBase):
    """The master of a Redis Sentinel group: ``redis-sentinel://s1:26379,s2:26379/service``.

    redis-py's Sentinel support asks the sentinels for the current master on each new
    connection, so after a failover the next call (after the RemoteBackend's reconnect) reaches
    the promoted replica.
    """

    # After a failover, ask the sentinels again rather than retry a dead master.
    _rebuild_after_failure = True

    def __init__(self, url: str, *, timeout: float) -> None:
        super().__init__(url, timeout=timeout)
        self.sentinels, options = parse_cluster_url(url)  # bad URLs fail at start, not later
        self.credentials = {k: options[k] for k in ("username", "password") if k in options}
        path = urlsplit(url).path.strip("/")
        self.service = (
            unquote(path) or os.environ.get("REDIS_SERVICE_NAME") or DEFAULT_SENTINEL_SERVICE
        )

    def _make_client(self) -> Any:
        sentinel = Sentinel(
            self.sentinels,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
        )
        return sentinel.master_for(
            self.service,
            socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            **self.credentials,
        )

    def describe(self) -> str:
        return f"{redact_url(self.url)} (service {self.service})"
