"""Bounded asynchronous write-through to one lower tier, on one thread.

Puts are queued by key (a newer put of the same key replaces the queued one) and written in
batches, so a Redis tier pipelines them. When the queue is over its byte or item bound, a put is
dropped and counted: this is a cache, and dropping a copy beats blocking the request loop.

``cancel(key)`` drops a queued put and waits for an in-flight write of that key to finish, so
that a delete issued after it cannot be overtaken by the write it cancelled.

A put may name its ``origin`` (the client connection that sent it). When that put's copy is
dropped (full queue, shutdown) or its write fails, ``on_loss(origin, kind)`` is called, so that
the origin's next ``flush`` can report the loss instead of claiming success.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import structlog

from lmcached.storage.base import Block

log = structlog.get_logger("lmcached.storage.writequeue")

WriteBatch = Callable[[Sequence[tuple[bytes, Block]]], list[bool]]
# Called with (origin, "dropped" | "failed") for each lost copy of a put that named its origin.
LossHook = Callable[[bytes, str], None]


class WriteQueue:
    """Feed ``write`` with batches of queued puts from a background thread."""

    def __init__(
        self,
        name: str,
        write: WriteBatch,
        *,
        max_bytes: int,
        max_items: int = 4096,
        batch_items: int = 32,
        batch_bytes: int = 64 << 20,
        idle_hook: Callable[[], object] | None = None,
        idle_interval: float = 1.0,
        on_loss: LossHook | None = None,
    ) -> None:
        self.name = name
        self._on_loss = on_loss
        # key -> origin of the queued or in-flight put of that key (only puts that named one).
        self._origins: dict[bytes, bytes] = {}
        self._write = write
        self._idle_hook = idle_hook
        self._idle_interval = idle_interval
        self.max_bytes = max_bytes
        self.max_items = max_items
        self.batch_items = batch_items
        self.batch_bytes = batch_bytes
        self._pending: OrderedDict[bytes, Block] = OrderedDict()
        self._pending_bytes = 0
        self._inflight: set[bytes] = set()
        self._inflight_blocks: dict[bytes, Block] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self.enqueued = 0
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name=f"write-{name}", daemon=True)
        self._thread.start()

    def offer(self, key: bytes, block: Block, origin: bytes | None = None) -> bool:
        """Queue a put without blocking; return False (and count a drop) when full."""
        with self._cond:
            if self._stopping:
                self._drop(origin)
                return False
            old = self._pending.pop(key, None)
            if old is not None:
                # Superseded by this newer put of the key: not a loss.
                self._pending_bytes -= old.nbytes
                if key not in self._inflight:
                    self._origins.pop(key, None)
            if (
                self._pending_bytes + block.nbytes > self.max_bytes
                or len(self._pending) >= self.max_items
            ):
                self._drop(origin)
                return False
            self._pending[key] = block
            self._pending_bytes += block.nbytes
            if origin is not None:
                self._origins[key] = origin
            self.enqueued += 1
            self._cond.notify_all()
            return True

    def _drop(self, origin: bytes | None) -> None:
        self.dropped += 1
        if origin is not None and self._on_loss is not None:
            self._on_loss(origin, "dropped")

    def _lost(self, keys: Iterable[bytes], kind: str) -> None:
        # Under the condition's lock. The hook only counts, so it never calls back in here.
        for key in keys:
            origin = self._origins.pop(key, None)
            if origin is not None and self._on_loss is not None:
                self._on_loss(origin, kind)

    def cancel(self, keys: Iterable[bytes], timeout: float = 5.0) -> None:
        """Drop queued puts of ``keys`` and wait (bounded) for in-flight writes of them."""
        keys = set(keys)
        deadline = time.monotonic() + timeout
        with self._cond:
            for key in keys:
                old = self._pending.pop(key, None)
                if old is not None:
                    self._pending_bytes -= old.nbytes
                    if key not in self._inflight:
                        self._origins.pop(key, None)  # deleted, not lost
            while self._inflight & keys:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)

    def peek(self, key: bytes) -> Block | None:
        """Return the block queued (or being written) for ``key``, if any."""
        with self._cond:
            block = self._pending.get(key)
            if block is None and key in self._inflight:
                block = self._inflight_blocks.get(key)
            return block

    def _take_batch(self) -> list[tuple[bytes, Block]]:
        batch: list[tuple[bytes, Block]] = []
        nbytes = 0
        while self._pending and len(batch) < self.batch_items:
            key, block = next(iter(self._pending.items()))
            if batch and nbytes + block.nbytes > self.batch_bytes:
                break
            del self._pending[key]
            self._pending_bytes -= block.nbytes
            nbytes += block.nbytes
            batch.append((key, block))
        return batch

    def _run(self) -> None:
        while True:
            idle = False
            with self._cond:
                while not self._pending and not self._stopping:
                    if self._idle_hook is not None:
                        if not self._cond.wait(self._idle_interval):
                            idle = True
                            break
                    else:
                        self._cond.wait()
                if not self._pending and self._stopping:
                    return
            if idle:
                # Nothing to write for a while: let the tier do upkeep (the remote probes a
                # down store, so `status` shows recovery without waiting for traffic).
                try:
                    self._idle_hook()  # type: ignore[misc]
                except Exception:
                    log.exception("idle upkeep failed", tier=self.name)
                continue
            with self._cond:
                if not self._pending:
                    continue
                batch = self._take_batch()
                self._inflight = {k for k, _ in batch}
                self._inflight_blocks = dict(batch)
            try:
                results = self._write(batch)
            except Exception:
                log.exception("write-through batch failed", tier=self.name, blocks=len(batch))
                results = [False] * len(batch)
            with self._cond:
                self.written += sum(1 for ok in results if ok)
                self.failed += sum(1 for ok in results if not ok)
                for (key, _), ok in zip(batch, results, strict=False):
                    if key in self._pending:
                        continue  # a newer put of the key is queued; its origin is what counts
                    origin = self._origins.pop(key, None)
                    if not ok and origin is not None and self._on_loss is not None:
                        self._on_loss(origin, "failed")
                self._inflight = set()
                self._inflight_blocks = {}
                self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._inflight

    def flush(self, timeout: float | None) -> bool:
        """Wait until the queue is empty and nothing is in flight; return True if it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout: float) -> bool:
        """Write what is queued (for at most ``timeout`` s), then stop; return True if drained.

        Idempotent. Blocks still queued at the deadline are dropped and counted.
        """
        drained = self.flush(timeout)
        with self._cond:
            self._stopping = True
            if not drained:
                self.dropped += len(self._pending)
                self._lost(list(self._pending), "dropped")
                self._pending.clear()
                self._pending_bytes = 0
            self._cond.notify_all()
        self._thread.join(timeout=max(timeout, 0.1))
        return drained

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "queued": len(self._pending),
                "queued_bytes": self._pending_bytes,
                "enqueued": self.enqueued,
                "written": self.written,
                "write_failures": self.failed,
                "queue_drops": self.dropped,
            }
