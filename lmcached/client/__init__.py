"""The Python client of lmcached, in three layers as redis-py has them.

- :mod:`lmcached.client.api`: the public :class:`Client` (put, get, lookup ...).
- :mod:`lmcached.client.cluster`: the cluster map, key routing and the control socket.
- :mod:`lmcached.client.connection`: per-worker sockets, fork safety, CURVE and pipelining.
- :mod:`lmcached.client.retry`: the resend policy, a value passed in (:class:`Retry`).
- :mod:`lmcached.client.settings`: what a client reads from a daemon's config file.

A client process imports none of the daemon's code (storage, extensions, the daemon itself).
"""

from __future__ import annotations

from lmcached.client.api import DEFAULT_TIMEOUT_S, Client, FlushReport
from lmcached.client.retry import Retry

__all__ = ["DEFAULT_TIMEOUT_S", "Client", "FlushReport", "Retry"]
