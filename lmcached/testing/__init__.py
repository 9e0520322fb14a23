"""Real processes for tests and benchmarks: an lmcached daemon and a redis-server.

Nothing here is a fake: ``DaemonProcess`` runs ``lmcached start`` as a subprocess on ephemeral
ports with a private runtime folder, ``RedisServer`` runs the real ``redis-server`` binary on a
free loopback port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from lmcached import config as config_mod
from lmcached import runtime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Any, timeout: float, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class DaemonProcess:
    """Run a real lmcached daemon in a temp folder; a context manager that stops it."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        **overrides: Any,
    ) -> None:
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
            [sys.executable, "-m", "lmcached", "start", "--config", str(self.config_path)],
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
        data = runtime.read_endpoints(self.cfg)
        return bool(data) and data.get("pid") == self.proc.pid

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
        data = runtime.read_endpoints(self.cfg)
        if not data:
            raise RuntimeError("daemon is not running")
        return str(data["control"]["tcp"])

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

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._runtime, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer:
    """Run a real redis-server on a free loopback port in a temp folder."""

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lmredis-"))
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        wait_until(self._answers, timeout, what=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
