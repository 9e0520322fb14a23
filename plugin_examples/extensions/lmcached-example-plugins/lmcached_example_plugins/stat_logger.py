"""A stat logger (vLLM's kind): append every stats snapshot the scheduler hands it to a file.

Found through the entry point ``jsonl`` of the group ``lmcached.stat_logger_plugins``. Its one
option comes from the config's ``extra_config``::

    stat_logger_interval: 10
    extra_config:
      stat_logger.jsonl.path: /var/log/lmcached/stats.jsonl

Each line is one snapshot, cut down to what a dashboard would plot. Without ``path`` it records
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmcached.extensions.lifecycle import PluginConfig
from lmcached.extensions.stat_logger import StatLogger


@dataclass
class JsonlConfig(PluginConfig):
    path: str | None = None


class JsonlStatLogger(StatLogger):
    """Append one JSON line per snapshot: time, epoch, and per worker its tiers' counters."""

    config_class = JsonlConfig

    def __init__(self, options: Mapping[str, Any] | None = None, context: Any = None) -> None:
        super().__init__(options, context)
        self._file: Any = None
        self._lines = 0

    def on_startup(self) -> None:
        if self.config.path:
            self._file = open(self.config.path, "a")  # noqa: SIM115 - closed in on_shutdown

    def record(self, snapshot: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        line = {
            "time": snapshot.get("time"),
            "epoch": snapshot.get("epoch"),
            "workers": {
                str(w["id"]): (w.get("stats") or {}).get("store", {})
                for w in snapshot.get("workers", [])
            },
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self._lines += 1

    def on_shutdown(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def get_metrics(self) -> dict[str, Any]:
        return {"lines": self._lines}
