"""``fs://`` remote: a folder shared by several daemons (NFS, a shared volume).

Values are block files in the disk tier's format (docs/format.md), written to a temporary name
and renamed, so a reader on another host sees a file complete or not at all. Files fan out into
256 subfolders by hash so that no folder grows huge. ``remote_ttl`` does not apply: a shared
folder has no expiry, so bound it with an external job (or let `lmcached purge` clear it).

The timeout cannot bound a hung network file system call (POSIX has no deadline for read());
mount with ``soft,timeo=`` options if that matters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from urllib.parse import unquote, urlsplit

from lmcached.storage.base import Buffer
from lmcached.storage.blockfile import (
    BLOCK_SUFFIX,
    FileTooLarge,
    file_name,
    is_temp_name,
    read_block_header,
    read_file,
    write_file_atomic,
)
from lmcached.storage.blockformat import BlockFormatError
from lmcached.storage.remote.connector import RemoteConnector, RemoteUnavailable, ValueTooLarge

STALE_TEMP_SECONDS = 3600


class FSConnector(RemoteConnector):
    """Store values as files under the folder of an ``fs:///absolute/path`` URL."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        # fs:///path, or LMCache's fs://host:port/path, whose host and port name no folder.
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"fs:// needs an absolute path such as fs:///mnt/kv, got {url!r}")
        self.root = path
        self.timeout = timeout
        self._closed = False

    def _where(self, key: bytes) -> tuple[str, str]:
        name = file_name(key)
        return os.path.join(self.root, name[:2]), name

    def _check_root(self) -> None:
        if self._closed:
            raise RemoteUnavailable("connector is closed")
        if not os.path.isdir(self.root):
            raise RemoteUnavailable(f"shared folder {self.root} is missing")

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | ValueTooLarge | None]:
        self._check_root()
        out: list[Buffer | ValueTooLarge | None] = []
        for key in keys:
            folder, name = self._where(key)
            try:
                out.append(read_file(os.path.join(folder, name), max_bytes=self.max_value_bytes))
            except FileNotFoundError:
                out.append(None)
            except FileTooLarge as exc:
                out.append(ValueTooLarge(str(exc)))
            except OSError as exc:
                raise RemoteUnavailable(f"reading {folder}/{name}: {exc}") from exc
        return out

    def put_many(self, items: Sequence[tuple[bytes, Sequence[Buffer]]], ttl: float | None) -> None:
        self._check_root()
        for key, pieces in items:
            folder, name = self._where(key)
            try:
                os.makedirs(folder, mode=0o700, exist_ok=True)
                write_file_atomic(folder, name, pieces)
            except OSError as exc:
                raise RemoteUnavailable(f"writing {folder}/{name}: {exc}") from exc

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_root()
        return [os.path.exists(os.path.join(*self._where(k))) for k in keys]

    def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_root()
        out = []
        for key in keys:
            try:
                os.unlink(os.path.join(*self._where(key)))
                out.append(True)
            except FileNotFoundError:
                out.append(False)
        return out

    def scan(self, prefix: bytes) -> Iterator[bytes]:
        self._check_root()
        keys = []
        for sub in os.scandir(self.root):
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub.path):
                if is_temp_name(entry.name):
                    self._remove_if_stale(entry)
                    continue
                if not entry.name.endswith(BLOCK_SUFFIX):
                    continue
                try:
                    header, _ = read_block_header(entry.path)
                except (OSError, BlockFormatError):
                    continue
                if header.key.startswith(prefix):
                    keys.append(header.key)
        return iter(keys)

    @staticmethod
    def _remove_if_stale(entry: os.DirEntry[str]) -> None:
        # A writer killed mid-write leaves its temporary file behind. Another host may be
        # writing one right now, so only old ones go (purge is the maintenance path).
        try:
            if time.time() - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                os.unlink(entry.path)
        except OSError:
            pass

    def ping(self) -> None:
        self._check_root()

    def close(self) -> None:
        self._closed = True

    def describe(self) -> str:
        return f"fs://{self.root}"
