"""An external storage backend: blocks in a sqlite file, under a byte budget.

Use it from an LMCache-style config::

    external_backends: [sqlite]
    extra_config:
      external_backend.sqlite.module_path: lmcached_example_plugins.sqlite_backend
      external_backend.sqlite.class_name: SqliteBackend
      external_backend.sqlite.path: /var/cache/lmcached/blocks-{worker_id}.sqlite
      external_backend.sqlite.capacity_bytes: 1073741824

``{worker_id}`` in ``path`` is replaced by the worker's id, so each worker has its own file.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lmcached.extensions.lifecycle import PluginBase, PluginConfig, PluginType
from lmcached.storage.base import Block, StorageBackend, Usage


@dataclass
class SqliteConfig(PluginConfig):
    path: str
    capacity_bytes: int = 1 << 30


class SqliteBackend(PluginBase, StorageBackend):
    """Store blocks as rows (key, value, nbytes); evict the oldest rows past the budget."""

    plugin_type = PluginType.KV_CACHE
    config_class = SqliteConfig

    def __init__(self, options: dict[str, Any] | None = None, context: Any = None) -> None:
        super().__init__(options, context)
        self.path = self.config.path.replace("{worker_id}", str(self.context.worker_id))
        self._db: sqlite3.Connection | None = None
        # The worker calls tiers from its loop thread and its I/O pool: one lock, one connection.
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def on_startup(self) -> None:
        # Raises sqlite3.OperationalError when the folder does not exist: the daemon then
        # disables this backend (or refuses to start with strict_plugins: true).
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute(
            "CREATE TABLE IF NOT EXISTS blocks "
            "(key BLOB PRIMARY KEY, value BLOB NOT NULL, nbytes INTEGER NOT NULL, "
            "seq INTEGER NOT NULL)"
        )
        db.execute("CREATE INDEX IF NOT EXISTS blocks_seq ON blocks(seq)")
        self._db = db

    def on_shutdown(self) -> None:
        self.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"sqlite backend {self.path} is not started (or closed)")
        return self._db

    def contains(self, key: bytes) -> bool:
        with self._lock:
            row = self._conn().execute("SELECT 1 FROM blocks WHERE key = ?", (key,)).fetchone()
        return row is not None

    def get(self, key: bytes) -> Block | None:
        with self._lock:
            row = self._conn().execute("SELECT value FROM blocks WHERE key = ?", (key,)).fetchone()
            if row is None:
                self._misses += 1
                return None
            self._hits += 1
        return Block.from_bytes(row[0])

    def put(self, key: bytes, block: Block) -> bool:
        if block.nbytes > self.config.capacity_bytes:
            return False
        with self._lock:
            db = self._conn()
            db.execute("BEGIN")
            db.execute(
                "INSERT OR REPLACE INTO blocks (key, value, nbytes, seq) VALUES "
                "(?, ?, ?, COALESCE((SELECT MAX(seq) FROM blocks), 0) + 1)",
                (key, block.tobytes(), block.nbytes),
            )
            used = db.execute("SELECT COALESCE(SUM(nbytes), 0) FROM blocks").fetchone()[0]
            while used > self.config.capacity_bytes:
                oldest = db.execute(
                    "SELECT key, nbytes FROM blocks ORDER BY seq LIMIT 1"
                ).fetchone()
                db.execute("DELETE FROM blocks WHERE key = ?", (oldest[0],))
                used -= oldest[1]
                self._evictions += 1
            db.execute("COMMIT")
        return True

    def remove(self, key: bytes) -> bool:
        with self._lock:
            cur = self._conn().execute("DELETE FROM blocks WHERE key = ?", (key,))
        return cur.rowcount > 0

    def iter_keys(self) -> Iterator[bytes]:
        with self._lock:
            rows = self._conn().execute("SELECT key FROM blocks").fetchall()
        return iter([bytes(r[0]) for r in rows])

    def usage(self) -> Usage:
        with self._lock:
            n, used = (
                self._conn()
                .execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM blocks")
                .fetchone()
            )
        return Usage(used_bytes=used, capacity_bytes=self.config.capacity_bytes, entries=n)

    def stats(self) -> dict[str, Any]:
        u = self.usage()
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "used_bytes": u.used_bytes,
            "entries": u.entries,
        }

    def get_metrics(self) -> dict[str, Any]:
        return {"path": self.path, "hits": self._hits, "misses": self._misses}

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            db.close()
