"""Reading a same-host client's own memory for a direct put (``process_vm_readv``).

A direct put is the one-copy put of the same-host path (docs/same-host.md): the client sends
only the addresses of its blocks, and the worker copies each block straight from the client's
memory into its arena slot, hashing every piece right after copying it. Nothing the client can
write is ever served: the arena stays read-only to clients.

What makes it safe to read another process's memory on its request:

- **Whose memory.** The pid is the one the kernel recorded when the client connected to the
  worker's ipc socket (``SO_PEERCRED``, which libzmq hands over as the ``Peer-Address``
  property of every message), never one the client claims. The process found at that pid must
  run as the connection's user (so a pid reused by another user's process is refused), live in
  our time namespace (the deadline below compares clocks), and stay alive until the copy is
  checked (a pidfd tells; while it has not exited its pid cannot be reused).
- **When.** The client's put carries its deadline on ``CLOCK_MONOTONIC``. A client returns from
  a put only when every request was answered, or once that deadline has passed; only then may
  it reuse its buffers. The worker checks the clock after a block's last piece is copied: a
  block copied completely before the deadline was copied while the client still waited, so
  its bytes are the ones the caller put. A block finished later is dropped.
- **What the kernel allows.** ``process_vm_readv`` needs the right to ptrace the client: the
  same user (and no Yama restriction), or ``CAP_SYS_PTRACE``. Where the kernel refuses, the
  worker refuses the direct put and the client falls back to its staging area (two copies).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lmcached.glibc import glibc_function

__all__ = ["PeerGone", "PeerMemory", "PeerRange", "PeerRefused", "Peers", "parse_peer_address"]


class PeerRefused(Exception):
    """The client's memory cannot be read at all (not ipc, another user, no permission)."""


class PeerGone(OSError):
    """A copy from the client cannot be trusted: it exited, or its deadline passed."""


class _IOVec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


_readv = glibc_function("process_vm_readv")
if _readv is not None:
    _readv.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IOVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    _readv.restype = ctypes.c_ssize_t


def parse_peer_address(value: str | None) -> tuple[int, int]:
    """(uid, pid) from libzmq's ``Peer-Address`` of an ipc connection (``host:uid:gid:pid``)."""
    parts = (value or "").rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        raise PeerRefused("a direct put needs an ipc connection from this host")
    uid, pid = int(parts[1]), int(parts[3])
    if pid <= 0:  # a client in a pid namespace that cannot see us
        raise PeerRefused("the client's pid is not visible from the worker")
    return uid, pid


def _namespace(pid: int | str, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except FileNotFoundError:  # a kernel without this namespace kind: one for everybody
        return None


def _refusal(err: int) -> None:
    """Raise PeerRefused for an errno that says this process may not be read at all."""
    if err in (errno.EPERM, errno.EACCES):
        raise PeerRefused("the kernel does not let the worker read the client's memory")


class PeerMemory:
    """One client process whose memory this worker may read, held by a pidfd."""

    def __init__(self, uid: int, pid: int) -> None:
        if _readv is None:
            raise PeerRefused("process_vm_readv is not available here")
        self.pid = pid
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError as exc:
            raise PeerRefused(f"cannot follow the client process: {exc.strerror}") from None
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                raise PeerRefused("the client's pid belongs to another user")
            if _namespace(pid, "time") != _namespace("self", "time"):
                raise PeerRefused("the client runs in another time namespace")
        except OSError as exc:
            self.close()
            raise PeerRefused(f"cannot inspect the client process: {exc.strerror}") from None
        except PeerRefused:
            self.close()
            raise
        self._readable = False

    def alive(self) -> bool:
        fd = self._pidfd
        if fd is None:
            return False
        # A pidfd turns readable when its process exits.
        return not select.select([fd], [], [], 0)[0]

    def check_readable(self, addr: int) -> None:
        """Raise PeerRefused if the kernel does not let this worker read the client.

        ``addr`` is one of the client's blocks: one byte of it is read to find out, until a
        read succeeds once (a bad address proves nothing either way).
        """
        if self._readable:
            return
        probe = ctypes.create_string_buffer(1)
        if self._copy(ctypes.addressof(probe), addr, 1) == 1:
            self._readable = True
            return
        _refusal(ctypes.get_errno())

    def check_deadline(self, until_ns: int) -> None:
        """Raise PeerGone if the put's deadline has passed: a copy must not even start."""
        if time.monotonic_ns() >= until_ns:
            raise PeerGone("the put's deadline passed before its bytes were read")

    def copy(self, local: int, remote: int, n: int) -> None:
        """Copy ``n`` bytes from the client's ``remote`` to our ``local``; no checks of time.

        What was copied counts only once :meth:`vouch` passes after the last such copy.
        """
        got = self._copy(local, remote, n)
        if got < 0:
            err = ctypes.get_errno()
            _refusal(err)
            if err == errno.ESRCH:
                raise PeerGone("the client exited during its put")
            raise OSError(err, f"cannot read the client's block: {os.strerror(err)}")
        if got != n:
            raise OSError(errno.EFAULT, f"only {got} of {n} bytes of the block were readable")

    def vouch(self, until_ns: int) -> None:
        """Raise PeerGone unless every copy made so far was made while the caller waited.

        Both conditions hold for all earlier copies once they hold now: the clock only moves
        forward, and a process that is alive now was alive throughout (its pidfd names that
        one process, whose pid no other process can take while it lives). So a block is
        checked once, after its last piece, not after each piece.
        """
        if time.monotonic_ns() >= until_ns:
            raise PeerGone("the put's deadline passed while its bytes were read")
        if not self.alive():
            raise PeerGone("the client exited during its put")

    def _copy(self, local: int, remote: int, n: int) -> int:
        # Called from the copy threads too: iovecs of its own per call.
        mine, theirs = _IOVec(local, n), _IOVec(remote, n)
        return int(_readv(self.pid, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0))

    def close(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass(frozen=True, slots=True)
class PeerRange:
    """``nbytes`` of a client's memory at ``addr``: a direct put's source (a
    :class:`~lmcached.storage.piece_copy.PieceSource`, like FileRange).

    ``pool``: copy threads a large block may be copied on (None: the calling thread only).
    """

    peer: PeerMemory
    addr: int
    nbytes: int
    until_ns: int
    pool: ThreadPoolExecutor | None = None

    def begin(self) -> None:
        """Refuse a copy that would start after the deadline.

        The deadline and the client's life are checked once more, after the last piece
        (:meth:`vouch`, which PeerMemory.vouch explains).
        """
        self.peer.check_deadline(self.until_ns)

    def copy(self, local: int, at: int, n: int) -> None:
        self.peer.copy(local, self.addr + at, n)

    def vouch(self) -> None:
        self.peer.vouch(self.until_ns)


class Peers:
    """The client processes of direct puts, most recently used kept open (their pidfds)."""

    MAX_OPEN = 64

    def __init__(self) -> None:
        self._open: OrderedDict[tuple[int, int], PeerMemory] = OrderedDict()

    def get(self, peer_address: str | None) -> PeerMemory:
        """The process that sent a message, from its ``Peer-Address``; PeerRefused if none."""
        uid, pid = parse_peer_address(peer_address)
        key = (uid, pid)
        peer = self._open.get(key)
        if peer is not None and peer.alive():
            self._open.move_to_end(key)
            return peer
        if peer is not None:  # exited: this pid may name another process now
            self._open.pop(key).close()
        peer = PeerMemory(uid, pid)
        self._open[key] = peer
        while len(self._open) > self.MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        return peer

    def forget_dead(self) -> None:
        for key, peer in list(self._open.items()):
            if not peer.alive():
                self._open.pop(key).close()

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
