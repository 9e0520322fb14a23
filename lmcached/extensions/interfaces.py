"""The interface of the ``remote_connector`` category.

``storage_backend`` uses :class:`lmcached.storage.base.StorageBackend`, ``eviction_policy``
:class:`lmcached.storage.eviction.EvictionPolicy` and ``codec`` :class:`lmcached.codecs.base.Codec`.
A remote connector is the byte-level contract of the remote tier (LMCache's
``RemoteConnector``): batched raw values in and out of one shared store, below the tier's block
format, checksums and write queues. The tiers module defines it
(``lmcached.storage.remote.connector``) and this module re-exports it as the category's interface.

The built-in schemes (redis, rediss, unix, redis+cluster, rediss+cluster, fs) are entries of
``builtin.yaml`` like any package's, and every connector, built-in or external, serves behind
the same :class:`lmcached.storage.remote.RemoteBackend` (block header and checksum, key prefix,
TTL, fail-fast health). A connector deriving from :class:`lmcached.extensions.lifecycle.PluginBase`
is built as ``cls(url, timeout=seconds, options=dict, context=ctx)``: ``options`` are the
``extra_config`` keys ``external_connector.<scheme>.<option>`` (less ``module_path`` and
``class_name``), ``context`` a :class:`lmcached.extensions.lifecycle.PluginContext`; any other
connector as ``cls(url, timeout=seconds)``.
"""

from __future__ import annotations

from lmcached.storage.remote.connector import RemoteConnector

__all__ = ["RemoteConnector"]
