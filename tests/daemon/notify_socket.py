"""A fake service manager: a unix datagram socket that records sd_notify messages."""

from __future__ import annotations

import os
import select
import socket
import time


class FakeNotifySocket:
    """Bind a datagram socket (a path, or an abstract '@name') and collect parsed messages."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bind_to = b"\0" + address[1:].encode() if address.startswith("@") else address
        self.sock.bind(bind_to)
        self.messages: list[dict[str, str]] = []

    def poll(self, timeout: float) -> bool:
        """Receive every pending message, waiting at most ``timeout`` for the first one."""
        got = False
        ready, _, _ = select.select([self.sock], [], [], timeout)
        while ready:
            data = self.sock.recv(65536).decode()
            self.messages.append(dict(line.split("=", 1) for line in data.split("\n") if line))
            got = True
            ready, _, _ = select.select([self.sock], [], [], 0)
        return got

    def wait_for(self, key: str, timeout: float = 30.0, since: int = 0) -> dict[str, str]:
        """Return the first message at index >= since carrying ``key``; fail after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages[since:]:
                if key in msg:
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} message within {timeout}s: {self.messages}")
            self.poll(min(left, 0.5))

    def wait_for_match(
        self, predicate, timeout: float = 30.0, since: int = 0
    ) -> tuple[int, dict[str, str]]:
        """Return (index, message) of the first message at index >= since matching predicate."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(since, len(self.messages)):
                if predicate(self.messages[i]):
                    return i, self.messages[i]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message within {timeout}s: {self.messages}")
            self.poll(min(left, 0.5))

    def close(self) -> None:
        if self.sock.fileno() != -1:
            self.sock.close()
        if not self.address.startswith("@") and os.path.exists(self.address):
            os.unlink(self.address)
