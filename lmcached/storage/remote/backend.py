"""RemoteBackend: the block format, verification, health and counters around any connector.

Health is a small circuit breaker. After a failure the remote is ``down`` and every call fails
at once, without touching the network, until the backoff delay has passed; then one call tries
again: exactly one, while concurrent callers keep failing at once until that probe ends. Success
makes it ``ok`` and resets the delay; another failure doubles it (up to ``backoff_max``). So a
dead Redis costs one timeout per backoff period, never one per request or per waiting thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import structlog

from lmcached.storage.base import Block, StorageBackend, TierStats, Usage
from lmcached.storage.blockformat import BlockFormatError, decode_block, encode_block
from lmcached.storage.remote.connector import RemoteConnector, RemoteUnavailable, ValueTooLarge

log = structlog.get_logger("lmcached.storage.remote")
T = TypeVar("T")

# Which counter a verification failure goes to (a miss and a delete either way).
_FAILURE_COUNTERS = {"mac": "mac_failures", "bad_meta": "bad_meta", "oversized": "oversized"}


class RemoteHealth:
    """Track whether the remote answers, and when to try it again after a failure."""

    def __init__(self, backoff_initial: float = 0.1, backoff_max: float = 10.0) -> None:
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.state = "ok"
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.retry_at = 0.0
        self._delay = backoff_initial
        # True while the one call let through to test a down remote has not finished.
        self._probing = False
        self._lock = threading.Lock()

    def may_try(self) -> bool:
        """True while the remote is ok; when it is down, True for one probe per backoff period."""
        with self._lock:
            if self.state == "ok":
                return True
            if self._probing or time.monotonic() < self.retry_at:
                return False
            self._probing = True
            return True

    def retry_due(self) -> bool:
        """True when the remote is down, no probe is running and its retry time has come.

        A question only: unlike :meth:`may_try` it claims nothing, so a caller that goes on to
        :meth:`RemoteBackend._call` does not find the probe already taken by itself.
        """
        with self._lock:
            return self.state != "ok" and not self._probing and time.monotonic() >= self.retry_at

    def probe_abandoned(self) -> None:
        """The probe ended without a verdict (an unexpected error): let the next caller probe."""
        with self._lock:
            self._probing = False

    def succeeded(self) -> bool:
        """Record a success; return True when this ended an outage."""
        with self._lock:
            recovered = self.state != "ok"
            self.state = "ok"
            self._probing = False
            self.consecutive_failures = 0
            self._delay = self.backoff_initial
            return recovered

    def failed(self, error: str) -> bool:
        """Record a failure; return True when this started an outage."""
        with self._lock:
            started = self.state == "ok"
            self.state = "down"
            self._probing = False
            self.consecutive_failures += 1
            self.last_error = error
            self.retry_at = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, self.backoff_max)
            return started

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "health": self.state,
                "consecutive_failures": self.consecutive_failures,
                "last_error": self.last_error,
                "retry_in_s": round(max(0.0, self.retry_at - time.monotonic()), 3)
                if self.state != "ok"
                else 0.0,
            }


class RemoteBackend(StorageBackend):
    """Store blocks in a shared remote store through a connector, verified on every read.

    Keys are stored as ``key_prefix + key``. Reads that fail verification (checksum, metadata,
    MAC, size cap) delete the remote value and count the failure; each value of a batch fails
    alone. When the remote is down every call returns at once as a
    miss (get), False (put) or 0 (remove), and is counted.
    """

    name = "remote"

    def __init__(
        self,
        connector: RemoteConnector,
        *,
        key_prefix: bytes = b"lmcached:",
        ttl: float | None = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        owner: Callable[[bytes], int] | None = None,
        worker_id: int = 0,
        integrity_secret: bytes | None = None,
        max_value_bytes: int | None = None,
    ) -> None:
        self.connector = connector
        # With a secret every value written carries a MAC, and a value read without a valid
        # one is a miss: a writer to the shared store without the secret cannot forge blocks.
        self.secret = integrity_secret
        # The largest value a reader accepts (largest block + largest header): a bigger value
        # was not written by lmcached, and must not make a worker buffer it whole.
        self.max_value_bytes = max_value_bytes
        connector.max_value_bytes = max_value_bytes
        self.prefix = key_prefix
        self.ttl = ttl or None
        self.health = RemoteHealth(backoff_initial, backoff_max)
        self._owner = owner
        self.worker_id = worker_id
        self.counters = TierStats()
        for name in (
            "checksum_failures",
            "unavailable",
            "skipped_while_down",
            "unsupported_version",
            "mac_failures",
            "bad_meta",
            "oversized",
            "rejected_blocks",
        ):
            self.counters.extra[name] = 0
        self._count_lock = threading.Lock()
        self._closed = False

    # --- plumbing ---------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            if hasattr(self.counters, name):
                setattr(self.counters, name, getattr(self.counters, name) + n)
            else:
                self.counters.extra[name] = self.counters.extra.get(name, 0) + n

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one connector call under the health policy; raise RemoteUnavailable on failure."""
        if not self.health.may_try():
            self._count("skipped_while_down")
            raise RemoteUnavailable(f"remote is down ({self.health.last_error})")
        try:
            result = fn()
        except RemoteUnavailable as exc:
            self._count("unavailable")
            if self.health.failed(str(exc)):
                log.warning(
                    "remote store unavailable", remote=self.connector.describe(), error=str(exc)
                )
            raise
        except BaseException:
            self.health.probe_abandoned()
            raise
        if self.health.succeeded():
            log.info("remote store reachable again", remote=self.connector.describe())
        return result

    def _full(self, key: bytes) -> bytes:
        return self.prefix + key

    # --- StorageBackend ---------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        return self.contains_many([key])[0]

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        full = [self._full(k) for k in keys]
        try:
            return self._call(lambda: self.connector.exists_many(full))
        except RemoteUnavailable:
            return [False] * len(keys)

    def get(self, key: bytes) -> Block | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[bytes]) -> list[Block | None]:
        full = [self._full(k) for k in keys]
        try:
            values = self._call(lambda: self.connector.get_many(full))
        except RemoteUnavailable:
            self._count("misses", len(keys))
            return [None] * len(keys)
        except Exception as exc:  # a bad reply (e.g. WRONGTYPE): a miss, never a crash
            log.warning("remote get failed", remote=self.connector.describe(), error=str(exc))
            self._count("errors")
            self._count("misses", len(keys))
            return [None] * len(keys)
        out: list[Block | None] = []
        corrupt: list[bytes] = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                self._count("misses")
                out.append(None)
                continue
            try:
                if isinstance(value, ValueTooLarge):
                    raise BlockFormatError("oversized", str(value))
                _, block = decode_block(value, self._full(key), self.secret)
            except BlockFormatError as exc:
                # Each value fails alone: the other keys of the batch are still served.
                self._count("misses")
                out.append(None)
                if exc.kind == "unsupported_version":
                    self._count("unsupported_version")
                    continue
                log.warning("remote block failed verification", key=key, error=str(exc))
                self._count(_FAILURE_COUNTERS.get(exc.kind, "checksum_failures"))
                corrupt.append(self._full(key))
                continue
            self._count("hits")
            self._count("bytes_read", block.nbytes)
            out.append(block)
        if corrupt:
            # When this fails it is counted, and the next reader detects the damage again.
            with contextlib.suppress(RemoteUnavailable):
                self._call(lambda: self.connector.delete_many(corrupt))
        return out

    def put(self, key: bytes, block: Block) -> bool:
        return self.put_many([(key, block)])[0]

    def put_many(self, items: Iterable[tuple[bytes, Block]]) -> list[bool]:
        items = list(items)
        if not items:
            return []
        # The header names the stored key (prefix included), so a value describes itself in a
        # shared store and an fs:// scan can read keys back from the files.
        results = [False] * len(items)
        encoded = []
        sent: list[int] = []
        for i, (k, b) in enumerate(items):
            try:
                encoded.append((self._full(k), encode_block(self._full(k), b, self.secret)))
                sent.append(i)
            except (ValueError, TypeError) as exc:
                # A block the format cannot hold (key or meta too large) fails alone.
                self._count("rejected")
                self._count("rejected_blocks")
                if self.counters.extra["rejected_blocks"] == 1:
                    log.warning("remote tier rejected a block", key=k[:80], error=str(exc))
        if not encoded:
            return results
        try:
            self._call(lambda: self.connector.put_many(encoded, self.ttl))
        except RemoteUnavailable:
            self._count("errors", len(encoded))
            return results
        except Exception as exc:  # e.g. Redis maxmemory with noeviction: OOM command not allowed
            log.warning("remote put rejected", remote=self.connector.describe(), error=str(exc))
            self._count("rejected", len(encoded))
            return results
        self._count("puts", len(encoded))
        self._count("bytes_stored", sum(items[i][1].nbytes for i in sent))
        for i in sent:
            results[i] = True
        return results

    def remove(self, key: bytes) -> bool:
        return self.remove_many([key])[0]

    def remove_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        full = [self._full(k) for k in keys]
        try:
            return self._call(lambda: self.connector.delete_many(full))
        except RemoteUnavailable:
            self._count("errors")
            return [False] * len(keys)

    def iter_keys(self) -> Iterator[bytes]:
        return iter(self.keys_with_prefix(b"", owned_only=False))

    def keys_with_prefix(self, prefix: bytes, *, owned_only: bool = True) -> list[bytes]:
        """Return remote keys under ``prefix``; by default only those this worker owns.

        Every worker of a daemon shares the remote and `purge` reaches every worker: each one
        deletes only the keys it owns, so the counts add up and no key is counted twice.
        """
        try:
            full = self._call(lambda: list(self.connector.scan(self.prefix + prefix)))
        except RemoteUnavailable:
            self._count("errors")
            return []
        n = len(self.prefix)
        keys = [k[n:] for k in full]
        if owned_only and self._owner is not None:
            keys = [k for k in keys if self._owner(k) == self.worker_id]
        return keys

    def usage(self) -> Usage:
        # The shared store's size is bounded by its own settings (Redis maxmemory), not by us.
        return Usage(used_bytes=0, capacity_bytes=0, entries=0)

    def probe(self) -> bool:
        """Ping the remote (when it is ok, or a retry is due); return whether it answered."""
        try:
            self._call(self.connector.ping)
        except RemoteUnavailable:
            return False
        return True

    def upkeep(self) -> None:
        """Called by the write thread when idle: probe a down remote once its retry is due."""
        if self.health.retry_due():
            self.probe()

    def stats(self) -> dict[str, Any]:
        with self._count_lock:
            counters = self.counters.as_dict()
        health = self.health.as_dict()
        up = int(health["health"] == "ok")
        # The connector's own numbers (an external connector's plugin metrics) come first, so
        # they can never overwrite the tier's counters.
        return {
            **self.connector.stats(),
            **counters,
            **health,
            "up": up,
            "url": self.connector.describe(),
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.connector.close()
