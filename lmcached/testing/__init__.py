"""Start real, throwaway processes for tests and benchmarks; nothing here is a fake.

- :mod:`~lmcached.testing.daemon_process`: ``DaemonProcess`` runs ``lmcached start`` as a
  subprocess on ephemeral ports with a private runtime folder, and stops it (idempotently).
- :mod:`~lmcached.testing.redis_server`: ``RedisServer`` runs the real ``redis-server`` binary on
  a free loopback port.
- :mod:`~lmcached.testing.waiting`: ``wait_until`` (poll a condition, fail naming it) and
  ``free_port``.
- :mod:`~lmcached.testing.tiny_llama`: small random-weight Llama checkpoints built offline for
  the vLLM tests and benchmark (needs the vLLM environment; not imported here).

Shipped in the wheel so that ``lmcached bench`` runs from an installed package.
"""

from lmcached.testing.daemon_process import DaemonProcess
from lmcached.testing.redis_server import RedisServer
from lmcached.testing.waiting import free_port, wait_until

__all__ = ["DaemonProcess", "RedisServer", "free_port", "wait_until"]
