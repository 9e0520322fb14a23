"""An external remote connector for the made-up scheme ``folder://`` over a local folder.

``remote_url: folder:///srv/kv`` stores each value as one file in /srv/kv, named by the hex of
its key, written to a temp file and renamed so a reader never sees half a value. Declare it in
an LMCache-style config::

    remote_url: folder:///srv/kv
    extra_config:
      external_connector.folder.module_path: lmcached_example_plugins.folder_connector
      external_connector.folder.class_name: FolderConnector
      external_connector.folder.fsync: false

or install this package: its register function adds the same entry to the registry.
TTLs are ignored (a folder has no expiry); a real connector would honour them.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from lmcached.extensions.interfaces import RemoteConnector
from lmcached.extensions.lifecycle import PluginBase, PluginConfig, PluginType


@dataclass
class FolderConfig(PluginConfig):
    fsync: bool = False


class FolderConnector(PluginBase, RemoteConnector):
    """One file per key in the folder named by the URL's path."""

    plugin_type = PluginType.KV_CACHE
    config_class = FolderConfig

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        options: dict[str, Any] | None = None,
        context: Any = None,
    ) -> None:
        super().__init__(options, context)
        parts = urlsplit(url)
        if parts.scheme != "folder" or not parts.path:
            raise ValueError(f"expected a URL such as folder:///abs/path, got {url!r}")
        self.root = unquote(parts.path)
        self.timeout = timeout  # local files: nothing to bound, kept for the interface
        self.puts = 0
        self.gets = 0

    def on_startup(self) -> None:
        os.makedirs(self.root, mode=0o700, exist_ok=True)

    def _path(self, key: bytes) -> str:
        return os.path.join(self.root, key.hex())

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            self.gets += 1
            try:
                with open(self._path(key), "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:
                out.append(None)
        return out

    def put_many(self, items: Sequence[tuple[bytes, Sequence[Any]]], ttl: float | None) -> None:
        for key, pieces in items:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    for piece in pieces:
                        f.write(piece)
                    if self.config.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, self._path(key))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self.puts += 1

    def exists_many(self, keys: Sequence[bytes]) -> list[bool]:
        return [os.path.exists(self._path(k)) for k in keys]

    def delete_many(self, keys: Sequence[bytes]) -> list[bool]:
        out = []
        for key in keys:
            try:
                os.unlink(self._path(key))
                out.append(True)
            except FileNotFoundError:
                out.append(False)
        return out

    def scan(self, prefix: bytes) -> Iterator[bytes]:
        for name in os.listdir(self.root):
            if name.startswith(".tmp-"):
                continue
            try:
                key = bytes.fromhex(name)
            except ValueError:
                continue
            if key.startswith(prefix):
                yield key

    def ping(self) -> None:
        if not os.path.isdir(self.root):
            raise OSError(f"folder {self.root} is gone")

    def describe(self) -> str:
        return f"folder://{self.root}"

    def get_metrics(self) -> dict[str, Any]:
        return {"root": self.root, "puts": self.puts, "gets": self.gets}

    def close(self) -> None:
        return None  # nothing held open between calls
