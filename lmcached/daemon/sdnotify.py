"""Speak systemd's sd_notify protocol: READY, STATUS, WATCHDOG, STOPPING, RELOADING.

The protocol is one unix datagram of newline-separated ``KEY=value`` lines sent to the socket
named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). It is small enough
that we speak it ourselves instead of depending on libsystemd bindings, and it must be a no-op
when the daemon is not run by systemd (``NOTIFY_SOCKET`` unset).

Notifications are best effort: a failed send is logged once and never stops the daemon, because
systemd treats a missing READY as a start failure anyway and we would rather keep serving.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("lmcached.sdnotify")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _socket_address(name: str) -> str | bytes:
    """Translate NOTIFY_SOCKET into a sendto() address; '@x' is the abstract socket '\\0x'."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment; systemd would misread the rest.
    return " ".join(text.split())


class Notifier:
    """Send sd_notify messages to the service manager, or do nothing outside systemd.

    Construct it with :meth:`from_environment` in the main process. ``unset_environment=True``
    (the default there) removes ``NOTIFY_SOCKET``/``WATCHDOG_*`` from ``os.environ`` so that
    worker and plugin processes never inherit them and never speak for the daemon.
    """

    def __init__(self, notify_socket: str | None, watchdog_usec: int | None = None) -> None:
        self.notify_socket = notify_socket or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False
        self._closed = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = True
    ) -> Notifier:
        """Build a notifier from NOTIFY_SOCKET and WATCHDOG_USEC/WATCHDOG_PID."""
        env = os.environ if environ is None else environ
        path = env.get(NOTIFY_SOCKET_ENV) or None
        watchdog_usec: int | None = None
        raw_usec = env.get(WATCHDOG_USEC_ENV)
        raw_pid = env.get(WATCHDOG_PID_ENV)
        # WATCHDOG_PID names the process systemd expects pings from; another pid means the
        # variables were inherited from a parent and are not ours to honour.
        if raw_usec and (not raw_pid or raw_pid == str(os.getpid())):
            try:
                watchdog_usec = int(raw_usec)
            except ValueError:
                log.warning("ignoring a malformed WATCHDOG_USEC", value=raw_usec)
        if unset_environment and environ is None:
            for name in (NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV):
                os.environ.pop(name, None)
        return cls(path, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (NOTIFY_SOCKET was set)."""
        return self.notify_socket is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, **fields: str | int) -> bool:
        """Send one message of KEY=value fields; return True when it was sent."""
        if not self.enabled or self._closed:
            return False
        message = "\n".join(f"{key}={_one_line(str(value))}" for key, value in fields.items())
        assert self.notify_socket is not None
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(message.encode(), _socket_address(self.notify_socket))
                return True
            except OSError as exc:
                if not self._warned or exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    log.warning("sd_notify failed", socket=self.notify_socket, error=str(exc))
                    self._warned = True
                return False

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd the service is up (READY=1), optionally with a status line."""
        fields: dict[str, str | int] = {"READY": 1}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def status(self, text: str) -> bool:
        """Set the one-line status `systemctl status` shows."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the watchdog; call only while the daemon's own health checks pass."""
        return self.notify(WATCHDOG=1)

    def reloading(self, status: str | None = None) -> bool:
        """Announce a reload; MONOTONIC_USEC lets systemd order it against READY=1."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields: dict[str, str | int] = {"RELOADING": 1, "MONOTONIC_USEC": usec}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def stopping(self, status: str | None = None) -> bool:
        """Announce that the daemon is shutting down."""
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def close(self) -> None:
        """Close the datagram socket. Idempotent."""
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
