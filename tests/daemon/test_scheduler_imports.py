"""The scheduler process loads no store: tiers, codecs and the extensions that build or wrap a
store live in the workers only. The registry is loaded (general plugins and stat loggers run in
the scheduler too)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from lmcached import config as config_mod
from lmcached import runtime
from lmcached.testing import wait_until

# Run `lmcached start` exactly as the command line does; at exit, list the lmcached modules the
# process had loaded.
START_AND_LIST_MODULES = """
import atexit, sys
out, cfg = sys.argv[1], sys.argv[2]

def dump() -> None:
    with open(out, "w") as f:
        f.write("\\n".join(sorted(m for m in sys.modules if m.startswith("lmcached"))))

atexit.register(dump)
from lmcached.cli.main import main
sys.exit(main(["start", "--config", cfg]))
"""


# The extension modules that belong to a worker's store.
STORE_EXTENSIONS = (
    "lmcached.extensions.guard",
    "lmcached.extensions.interfaces",
    "lmcached.extensions.startup",
)


def test_a_running_scheduler_has_no_storage_codecs_or_extensions_loaded(tmp_path: Path) -> None:
    runtime_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"lmrt-imports-{os.getpid()}"
    values = {
        "port": 0,
        "num_workers": 2,
        "runtime_dir": str(runtime_dir),
        "max_local_cpu_size": "64MiB",
        "eviction_policy": "s3fifo",
        "local_disk": str(tmp_path / "disk"),
        "max_local_disk_size": "64MiB",
        "disk_codec": "zstd",
        "remote_url": f"fs://{tmp_path / 'remote'}",
        "log_format": "json",
    }
    cfg_path = tmp_path / "lmcached.yaml"
    cfg_path.write_text(yaml.safe_dump(values))
    cfg = config_mod.load(cfg_path, environ={})
    modules_file = tmp_path / "modules.txt"
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", START_AND_LIST_MODULES, str(modules_file), str(cfg_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def ready_or_dead() -> bool:
            data = runtime.read_endpoints(cfg)
            return proc.poll() is not None or (bool(data) and data.get("pid") == proc.pid)

        wait_until(ready_or_dead, 30, what="the daemon to become ready")
        assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        # The workers did build disk, remote and codec tiers: the store is real, just elsewhere.
        from lmcached.client import Client

        with Client.from_config(cfg_path) as client:
            totals = client.stats()["totals"]
        assert {"disk", "remote"} <= set(totals), totals
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "daemon.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
    modules = modules_file.read_text().split()
    assert "lmcached.daemon.scheduler" in modules
    loaded = [
        m
        for m in modules
        if m.split(".")[:2] in (["lmcached", "storage"], ["lmcached", "codecs"])
        or m in STORE_EXTENSIONS
        or m == "lmcached.daemon.worker"
        or m == "lmcached.daemon.assembly"
    ]
    assert loaded == [], loaded
