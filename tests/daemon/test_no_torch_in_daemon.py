"""The daemon's processes never load torch: it is for the client side only."""

from __future__ import annotations

import subprocess
import sys

import psutil


def test_daemon_modules_do_not_import_torch():
    code = (
        "import sys, lmcached.daemon.worker, lmcached.daemon.scheduler, lmcached.cli.main; "
        "from lmcached.daemon.assembly import build_store; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_running_workers_and_scheduler_have_no_torch_mapped(shared_daemon):
    for pid in [shared_daemon.pid, *shared_daemon.worker_pids()]:
        maps = [m.path for m in psutil.Process(pid).memory_maps()]
        assert maps, pid
        assert not [p for p in maps if "torch" in p.lower()], pid
