"""Run a real lmcached daemon (``lmcached start``) in a throwaway folder on ephemeral ports."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lmcached import config as config_mod
from lmcached import runtime
from lmcached.errors import LMCachedError
from lmcached.testing.waiting import wait_until


class DaemonProcess:
    """Run a real lmcached daemon in a temp folder; a context manager that stops it."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        **overrides: Any,
    ) -> None:
        """``wrapper``: a command that runs the daemon (``setpriv ...`` to drop capabilities)."""
        # A folder we made is ours to remove at close(); a caller's is the caller's.
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lmcd-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        # ipc paths are limited to 107 bytes, so the runtime folder lives in a short temp dir.
        self._runtime = tempfile.mkdtemp(prefix="lmrt-", dir="/tmp")
        values: dict[str, Any] = {
            "port": 0,
            "num_workers": 2,
            "max_local_cpu_size": "256MiB",
            "runtime_dir": self._runtime,
        }
        values.update(overrides)
        self.config_path = self.workdir / "lmcached.yaml"
        self.config_path.write_text(yaml.safe_dump(values))
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("LMCACHED_LOG_FORMAT", "json")
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "daemon.log"
        self._log_file: Any = None

    @property
    def cfg(self) -> config_mod.Config:
        return config_mod.load(self.config_path, environ={})

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *self.wrapper,
                sys.executable,
                "-m",
                "lmcached",
                "start",
                "--config",
                str(self.config_path),
            ],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        wait_until(lambda: self._ready_or_dead(), timeout, what="lmcached to become ready")
        if self.proc.poll() is not None:
            raise RuntimeError(f"lmcached exited with {self.proc.returncode}; log:\n{self.log()}")
        return self

    def _ready_or_dead(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return True
        return runtime.ready_pid(self.cfg) == self.proc.pid

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-20000:]
        return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        """The control endpoint same-host clients use: the ipc socket (TCP is off by default)."""
        return self.ipc_endpoint

    @property
    def tcp_endpoint(self) -> str:
        """The TCP control endpoint (only with ``enable_tcp=True``; CURVE is then required)."""
        data = runtime.read_endpoints(self.cfg)
        if not data:
            raise RuntimeError("daemon is not running")
        tcp = data["control"].get("tcp")
        if not tcp:
            raise RuntimeError("the daemon has no TCP endpoint; start it with enable_tcp=True")
        return str(tcp)

    @property
    def ipc_endpoint(self) -> str:
        data = runtime.read_endpoints(self.cfg)
        if not data:
            raise RuntimeError("daemon is not running")
        return str(data["control"]["ipc"])

    def client(self, **kw: Any) -> Any:
        from lmcached.client import Client

        return Client.from_config(self.config_path, **kw)

    def worker_pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            return [
                c.pid
                for c in psutil.Process(self.proc.pid).children(recursive=False)
                if "lmcached.daemon.worker" in " ".join(c.cmdline())
            ]
        return []

    def all_pids(self) -> list[int]:
        import psutil

        if self.proc is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            return [
                self.proc.pid,
                *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)),
            ]
        return []

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the daemon and wait; SIGKILL if it does not exit in ``timeout``. Idempotent."""
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    code = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
            else:
                code = proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def kill9(self) -> None:
        """SIGKILL the scheduler and every worker at once (a crash, not a shutdown).

        Only daemon processes are killed: plugin processes must die on their own, so a test
        that uses this would see an orphan.
        """
        if self.proc is None:
            return
        for pid in [self.proc.pid, *self.worker_pids()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def arena_paths(self) -> list[str]:
        """The shared-memory arena files of this daemon's workers (see docs/same-host.md)."""
        import glob

        from lmcached.shm.layout import ARENA_PREFIX, instance_tag

        tag = instance_tag(self.cfg.instance_dir)
        return sorted(glob.glob(f"/dev/shm/{ARENA_PREFIX}{tag}-*"))

    def close(self) -> None:
        self.stop()
        # A daemon killed with -9 leaves its arenas (its next start would remove them); a test
        # daemon never starts again.
        with contextlib.suppress(OSError, LMCachedError):
            for path in self.arena_paths():
                os.unlink(path)
        shutil.rmtree(self._runtime, ignore_errors=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
