"""Register function found through the entry point `example-register` (vLLM's style)."""

from __future__ import annotations

from typing import Any


def register(registry: Any) -> None:
    """Register the folder:// connector (a made-up scheme over a local folder)."""
    registry.register(
        "remote_connector",
        "folder",
        "lmcached_example_plugins.folder_connector:FolderConnector",
        description="folder:///abs/path - one file per key in a local folder (an example).",
        metadata={"url": "folder:///path/to/dir"},
    )
