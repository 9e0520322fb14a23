"""The interface of the ``stat_logger`` category: classes fed the daemon's stats periodically.

In the manner of vLLM's stat-logger plugins. The scheduler builds each registered stat logger
once at start as ``cls(options, context)`` (:class:`~lmcached.extensions.lifecycle.PluginBase`:
``options`` are the ``extra_config`` keys ``stat_logger.<name>.<option>``, type-checked against
``config_class``; ``context`` names the logger), runs ``on_startup``, then every
``stat_logger_interval`` seconds calls :meth:`StatLogger.record` with a snapshot: the document
``lmcached status --json`` prints (map epoch, uptime, per worker its tiers', ops' and latency
counters). ``on_shutdown`` runs once when the daemon stops.

Each logger runs on a thread of its own (:mod:`lmcached.daemon.stat_loggers`), so a logger that
raises is counted and keeps receiving snapshots, and one that is slow or stuck delays nobody:
while it is busy, newer snapshots replace the one waiting for it (counted as dropped).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from lmcached.extensions.lifecycle import PluginBase

__all__ = ["StatLogger"]


class StatLogger(PluginBase, abc.ABC):
    """Receive the daemon's stats snapshot every ``stat_logger_interval`` seconds."""

    @abc.abstractmethod
    def record(self, snapshot: Mapping[str, Any]) -> None:
        """Take one snapshot; raising counts an error and the next snapshot still comes."""
