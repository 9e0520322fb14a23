"""lmcached: a KV-cache daemon for LLM serving.

The bytes client lives in :mod:`lmcached.client`; key building in :mod:`lmcached.keys`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmcached.errors import (
    ConfigError,
    LMCachedBusy,
    LMCachedError,
    LMCachedRequestError,
    LMCachedTimeout,
    LMCachedUnavailable,
)
from lmcached.version import PROTOCOL_VERSION, __version__

if TYPE_CHECKING:
    from lmcached.client import Client

__all__ = [
    "PROTOCOL_VERSION",
    "Client",
    "ConfigError",
    "LMCachedBusy",
    "LMCachedError",
    "LMCachedRequestError",
    "LMCachedTimeout",
    "LMCachedUnavailable",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import lmcached` stays cheap in worker processes.
    if name == "Client":
        from lmcached.client import Client

        return Client
    raise AttributeError(name)
