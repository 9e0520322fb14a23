"""A general plugin (vLLM's kind): run once in every daemon process at start.

Found through the entry point ``example-marker`` of the group ``lmcached.general_plugins``. It
writes one marker file per process into the folder named by ``LMCACHED_EXAMPLE_MARKER_DIR``
(and does nothing when that is unset), so a test can see that the scheduler and every worker
ran it exactly once. A real one would set up tracing, register a codec, tune the allocator...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MARKER_DIR_ENV = "LMCACHED_EXAMPLE_MARKER_DIR"


def write_marker(process: Any) -> None:
    """Write ``<role>-<worker id>-<pid>.json`` into the marker folder; fail if it exists."""
    folder = os.environ.get(MARKER_DIR_ENV)
    if not folder:
        return
    worker = "" if process.worker_id is None else process.worker_id
    path = Path(folder) / f"{process.role}-{worker}-{process.pid}.json"
    # "x": a second run in the same process would raise, which the daemon reports.
    with open(path, "x") as f:
        json.dump({"role": process.role, "worker_id": process.worker_id, "pid": process.pid}, f)
