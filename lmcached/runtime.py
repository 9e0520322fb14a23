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
import tempfile
from pathlib import Path
from typing import Any, Protocol

import xxhash

from lmcached.security import share_with_group

ENDPOINTS_FILE = "endpoints.json"
LOCK_FILE = "lock"
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_IPC_PATH = 107


class RuntimeDirError(RuntimeError):
    """The runtime folder cannot be used (in use by another daemon, path too long ...)."""


class Instance(Protocol):
    """What the read side needs: the instance folder. A client's settings have it, and so does
    the daemon's Config; neither needs the other."""

    @property
    def instance_dir(self) -> str: ...


class DaemonInstance(Instance, Protocol):
    """What the daemon's side needs besides the folder (a Config has it)."""

    @property
    def host(self) -> str: ...

    @property
    def socket_group(self) -> str | None: ...


def default_runtime_dir() -> str:
    """Return the per-user runtime folder: $XDG_RUNTIME_DIR/lmcached, else /tmp/lmcached-<uid>."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return os.path.join(xdg, "lmcached")
    return os.path.join(tempfile.gettempdir(), f"lmcached-{os.getuid()}")


def derived_instance_name(source: str) -> str:
    """Name an instance after its config file, so two configs never share a folder."""
    return f"d{xxhash.xxh3_64_hexdigest(os.path.realpath(source).encode())[:10]}"


def instance_dir(cfg: Instance) -> Path:
    return Path(cfg.instance_dir)


def ipc_endpoint(cfg: Instance, name: str) -> str:
    path = instance_dir(cfg) / f"{name}.sock"
    if len(str(path)) > MAX_IPC_PATH:
        raise RuntimeDirError(
            f"ipc socket path {path} is {len(str(path))} bytes, over the {MAX_IPC_PATH}-byte limit; "
            "set a shorter runtime_dir"
        )
    return f"ipc://{path}"


def bind_endpoints(sock: Any, cfg: DaemonInstance, name: str, port: int | None) -> dict[str, str]:
    """Bind ``sock`` on ipc socket ``name`` and, when ``port`` is not None, on tcp (0 = ephemeral).

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


DEFAULT_INSTANCE = "default"


def default_control_endpoint() -> str:
    """The control endpoint of a daemon started without ``--config``, for this user: the ipc
    socket ``<default runtime_dir>/default/control.sock``."""
    return f"ipc://{os.path.join(default_runtime_dir(), DEFAULT_INSTANCE, 'control.sock')}"


def host_id() -> str:
    """Identify this host (and boot), so a client knows when ipc endpoints are reachable."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return f"{socket.gethostname()}/{boot}"


class InstanceLock:
    """An exclusive flock on the instance folder, held by the scheduler for its whole life."""

    def __init__(self, cfg: DaemonInstance) -> None:
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


def write_endpoints(cfg: DaemonInstance, data: dict[str, Any]) -> Path:
    """Atomically publish the daemon's endpoints."""
    target = instance_dir(cfg) / ENDPOINTS_FILE
    tmp = target.with_suffix(f".tmp.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.chmod(tmp, 0o640)
    share_with_group(tmp, cfg.socket_group, 0o640)
    os.replace(tmp, target)
    return target


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_endpoints(cfg: Instance) -> dict[str, Any] | None:
    """Return the published endpoints, or None when no daemon has published any."""
    try:
        data = json.loads((instance_dir(cfg) / ENDPOINTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def ready_pid(cfg: Instance) -> int | None:
    """Return the pid of the daemon whose workers all serve, or None (none, or still starting).

    The scheduler publishes its endpoints as soon as it binds them (``ready: false``) and again
    once every worker serves (``ready: true``); a file without the field predates that.
    """
    data = read_endpoints(cfg)
    if not data or not data.get("ready", True):
        return None
    pid = data.get("pid")
    return pid if isinstance(pid, int) else None


def remove_endpoints(cfg: Instance) -> None:
    with contextlib.suppress(OSError):
        (instance_dir(cfg) / ENDPOINTS_FILE).unlink()


def control_endpoint(cfg: Instance, prefer: str = "ipc") -> str | None:
    """Return the control endpoint of the daemon for ``cfg`` from its runtime file."""
    data = read_endpoints(cfg)
    if not data:
        return None
    control = data.get("control")
    if not isinstance(control, dict):
        return None
    for name in (prefer, "ipc", "tcp"):
        ep = control.get(name)
        if isinstance(ep, str) and ep:
            return ep
    return None
