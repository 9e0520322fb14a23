"""Extensions of lmcached.

- :mod:`lmcached.plugins.registry`: the in-process registry (storage backends, remote
  connectors, codecs, eviction policies).
- :mod:`lmcached.plugins.sources`: where entries come from (built-in manifest, the
  ``lmcached.plugins`` entry-point group, LMCache-style config), the ``LMCACHED_PLUGINS``
  allow-list, per-process idempotent loading.
- :mod:`lmcached.plugins.lifecycle`: the base class with ``validate_config`` / ``on_startup`` /
  ``on_shutdown`` / ``get_metrics`` and the guard that turns a failing backend into misses.
- :mod:`lmcached.plugins.startup`: what the daemon calls at start to check and build them.
- :mod:`lmcached.plugins.cli`: ``lmcached plugins``.
"""
