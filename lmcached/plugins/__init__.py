"""Extensions of lmcached.

In-process extensions (issue 5):

- :mod:`lmcached.plugins.registry`: the in-process registry (storage backends, remote
  connectors, codecs, eviction policies).
- :mod:`lmcached.plugins.sources`: where entries come from (built-in manifest, the
  ``lmcached.plugins`` entry-point group, LMCache-style config), the ``LMCACHED_PLUGINS``
  allow-list, per-process idempotent loading.
- :mod:`lmcached.plugins.lifecycle`: the base class with ``validate_config`` / ``on_startup`` /
  ``on_shutdown`` / ``get_metrics`` and the guard that turns a failing backend into misses.
- :mod:`lmcached.plugins.startup`: what the daemon calls at start to check and build them.
- :mod:`lmcached.plugins.cli`: ``lmcached plugins``.

Script plugins (issue 4): files in ``plugin_locations`` run as supervised subprocesses.

- :mod:`lmcached.plugins.discovery`: which files are plugins, which process runs each, with what
  interpreter, and which folders are refused as insecure.
- :mod:`lmcached.plugins.launcher`: ``PluginLauncher``, the supervisor of one process's plugins.
- :mod:`lmcached.plugins.shim`: the per-plugin process that owns its process group, so nothing
  outlives the daemon.
- :mod:`lmcached.plugins.daemon`: wires a launcher into the scheduler and each worker.
- :mod:`lmcached.plugins.commands`: ``lmcached reload`` and the plugin rows of ``lmcached status``.
"""

from __future__ import annotations

from typing import Any

_LAUNCHER_NAMES = ("PluginLauncher", "PluginPolicy", "PluginState")


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the extension registry never loads the script-plugin launcher.
    if name in _LAUNCHER_NAMES:
        from lmcached.plugins import launcher

        return getattr(launcher, name)
    raise AttributeError(name)
