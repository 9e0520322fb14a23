"""The daemon's runtime folder: its lock, ipc sockets and the endpoints file.

``<runtime_dir>/<instance>/`` belongs to one daemon. The scheduler holds ``lock`` (flock) for its
whole life and publishes its real endpoints in ``endpoints.json`` (written to a temp file and
renamed), which is how the CLI and ``Client.from_config`` find a daemon started with ``port: 0``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from lmcached.config import Config
from lmcached.security import share_with_group

ENDPOINTS_FILE = "endpoints.json"
LOCK_FILE = "lock"
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_IPC_PATH = 107


class RuntimeDirError(RuntimeError):
    """The runtime folder cannot be used (in use by another daemon, path too long ...)."""


def instance_dir(cfg: Config) -> Path:
    return Path(cfg.instance_dir)


def ipc_endpoint(cfg: Config, name: str) -> str:
    path = instance_dir(cfg) / f"{name}.sock"
    if len(str(path)) > MAX_IPC_PATH:
        raise RuntimeDirError(
            f"ipc socket path {path} is {len(str(path))} bytes, over the {MAX_IPC_PATH}-byte limit; "
            "set a shorter runtime_dir"
        )
    return f"ipc://{path}"


def bind_endpoints(sock: Any, cfg: Config, name: str, port: int | None) -> dict[str, str]:
    """Bind ``sock`` on tcp (``port``; 0 = ephemeral; None = no tcp) and on ipc socket ``name``.

    A stale socket file from a crashed run is removed first; the caller sets its permissions.
    """
    out: dict[str, str] = {}
    if port is not None:
        if port == 0:
            port = sock.bind_to_random_port(f"tcp://{cfg.host}")
        else:
            sock.bind(f"tcp://{cfg.host}:{port}")
        out["tcp"] = f"tcp://{cfg.host}:{port}"
    ipc = ipc_endpoint(cfg, name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ipc[len("ipc://") :])
    sock.bind(ipc)
    out["ipc"] = ipc
    return out


def host_id() -> str:
    """Identify this host (and boot), so a client knows when ipc endpoints are reachable."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{socket.gethostname()}/{boot}"


class InstanceLock:
    """An exclusive flock on the instance folder, held by the scheduler for its whole life."""

    def __init__(self, cfg: Config) -> None:
        self.dir = instance_dir(cfg)
        self.group = cfg.socket_group
        self._fd: int | None = None

    def acquire(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        share_with_group(self.dir, self.group, 0o750)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RuntimeDirError(
                f"another lmcached (pid {other}) already runs with runtime folder {self.dir}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def write_endpoints(cfg: Config, data: dict[str, Any]) -> Path:
    """Atomically publish the daemon's endpoints."""
    target = instance_dir(cfg) / ENDPOINTS_FILE
    tmp = target.with_suffix(f".tmp.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.chmod(tmp, 0o640)
    share_with_group(tmp, cfg.socket_group, 0o640)
    os.replace(tmp, target)
    return target


def read_endpoints(cfg: Config) -> dict[str, Any] | None:
    """Return the published endpoints, or None when no daemon has published any."""
    try:
        return json.loads((instance_dir(cfg) / ENDPOINTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def remove_endpoints(cfg: Config) -> None:
    with contextlib.suppress(OSError):
        (instance_dir(cfg) / ENDPOINTS_FILE).unlink()


def control_endpoint(cfg: Config, prefer: str = "tcp") -> str | None:
    """Return the control endpoint of the daemon for ``cfg`` from its runtime file."""
    data = read_endpoints(cfg)
    if not data:
        return None
    control = data.get("control", {})
    return control.get(prefer) or control.get("tcp") or control.get("ipc")
