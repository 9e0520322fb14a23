"""Remote tiers: a connector per URL scheme, wrapped by one RemoteBackend.

A :class:`~lmcached.storage.remote.connector.RemoteConnector` moves raw values to and from a
shared store (Redis, Redis Cluster, a shared folder). Connectors are entries of the plugin
registry keyed by URL scheme (``remote_connector`` in ``lmcached/extensions/builtin.yaml``), so an
external package's connector sits behind the same backend. The
:class:`~lmcached.storage.remote.backend.RemoteBackend` adds what every remote needs once: the
block format and its verification, the key prefix, the TTL, fail-fast health with reconnect
backoff, and the counters.
"""

from lmcached.storage.remote.backend import RemoteBackend
from lmcached.storage.remote.connector import RemoteConnector, RemoteUnavailable, make_connector

__all__ = ["RemoteBackend", "RemoteConnector", "RemoteUnavailable", "make_connector"]
