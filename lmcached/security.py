"""Authentication and socket permissions: ZMQ CURVE keys, the ZAP allow-list, refusal counts.

The default binds are loopback only and need no keys. Binding any other address is refused at
config load unless CURVE is configured (see ``config._check_authentication``): the daemon then
holds a secret certificate, every endpoint (control and data) runs as a CURVE server, and a ZAP
handler (pyzmq's ``ThreadAuthenticator``) admits only clients whose public key is in
``curve_authorized_keys``. Refused handshakes (no credentials, unknown key, wrong server key)
are counted from the sockets' monitor events and reported in ``stats``/metrics.

Certificates are the files ``zmq.auth.create_certificates`` writes (``NAME.key`` public,
``NAME.key_secret`` secret). Only paths appear in config and logs, never key material.
"""

from __future__ import annotations

import grp
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from lmcached.errors import ConfigError

log = structlog.get_logger("lmcached.security")

ZAP_DOMAIN = "lmcached"
REFUSAL_EVENTS = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


# ---------------------------------------------------------------------------------------------
# Keys.
# ---------------------------------------------------------------------------------------------


def keygen(
    directory: str | os.PathLike[str], name: str, *, force: bool = False
) -> tuple[Path, Path]:
    """Create NAME.key (public) and NAME.key_secret (secret, mode 0600) in ``directory``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"a key name is a plain file name, got {name!r}")
    folder = Path(directory)
    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not force and (public.exists() or secret.exists()):
        raise FileExistsError(f"{public} or {secret} exists; pass --force to replace the key pair")
    # The secret file must never be readable by others, not even for an instant.
    old_umask = os.umask(0o077)
    try:
        pub_path, sec_path = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old_umask)
    os.chmod(sec_path, 0o600)
    os.chmod(pub_path, 0o644)
    return Path(pub_path), Path(sec_path)


def load_secret_certificate(path: str, key: str) -> tuple[bytes, bytes]:
    """Return (public, secret) from a NAME.key_secret file; ConfigError naming ``key`` if bad."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot read a CURVE certificate from {path}: {exc}") from None
    if not secret:
        raise ConfigError(
            key, f"{path} holds only a public key; point it at the NAME.key_secret file"
        )
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXO):
        raise ConfigError(
            key, f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it"
        )
    return public, secret


def load_public_key(path: str, key: str) -> bytes:
    """Return the public key (z85) from a NAME.key or NAME.key_secret file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, f"cannot read a CURVE public key from {path}: {exc}") from None
    return public


# The daemon's own key pair when `enable_tcp` is on and no curve_secret_key_file is given:
# generated into the instance folder, so it is exactly as secret as the ipc sockets beside it.
GENERATED_KEYS_DIR = "curve"
GENERATED_KEY_NAME = "daemon"
GENERATED_AUTHORIZED_DIR = "authorized"


def generated_secret_path(instance_dir: str | os.PathLike[str]) -> Path:
    """Return where the daemon of ``instance_dir`` keeps a generated secret certificate."""
    return Path(instance_dir) / GENERATED_KEYS_DIR / f"{GENERATED_KEY_NAME}.key_secret"


def ensure_generated_keys(
    instance_dir: str | os.PathLike[str], group: str | None
) -> tuple[Path, Path]:
    """Create (once) the daemon's CURVE pair and an empty allow-list in the instance folder.

    Returns (secret certificate, allow-list folder). The secret file is mode 0640 with group
    ``socket_group``: whoever may use the ipc sockets may also read the key, so the TCP endpoint
    admits exactly the users the ipc sockets admit (plus keys an operator puts in the allow-list).
    An existing pair is reused, so clients keep working across restarts.
    """
    folder = Path(instance_dir) / GENERATED_KEYS_DIR
    secret = generated_secret_path(instance_dir)
    allowed = folder / GENERATED_AUTHORIZED_DIR
    if not secret.exists():
        keygen(folder, GENERATED_KEY_NAME, force=True)
    allowed.mkdir(mode=0o750, exist_ok=True)
    os.chmod(secret, 0o640)
    gid = resolve_group(group)
    for path in (folder, allowed, secret):
        if os.stat(path).st_gid != gid:
            os.chown(path, -1, gid)
    os.chmod(folder, 0o750)
    return secret, allowed


def readable_generated_certificate(instance_dir: str | os.PathLike[str]) -> str | None:
    """Return the generated secret certificate of ``instance_dir`` when this process may read it."""
    path = generated_secret_path(instance_dir)
    return str(path) if os.access(path, os.R_OK) else None


# ---------------------------------------------------------------------------------------------
# Server side.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerCurve:
    """The daemon's CURVE identity and the folder of authorised client keys."""

    public: bytes
    secret: bytes
    authorized_keys: str

    @classmethod
    def from_config(cls, cfg: Any) -> ServerCurve | None:
        """Load the daemon's keys, or None when CURVE is not configured (loopback default)."""
        if not cfg.curve_secret_key_file:
            return None
        public, secret = load_secret_certificate(cfg.curve_secret_key_file, "curve_secret_key_file")
        return cls(public, secret, cfg.curve_authorized_keys)

    def __repr__(self) -> str:  # never print the secret, even by accident
        public = self.public.decode()
        return f"ServerCurve(public={public!r}, authorized_keys={self.authorized_keys!r})"


class AuthGuard:
    """Own one process's ZAP handler and count refused handshakes on the sockets it secures.

    Create it once per process (scheduler, each worker) with the process's ZMQ context, call
    :meth:`secure` on every server socket before it binds, :meth:`reload` on SIGHUP to re-read
    the authorised keys, and :meth:`stop` at shutdown (idempotent).
    """

    # How often the allow-list folder is checked for added or removed keys.
    WATCH_INTERVAL_S = 1.0

    def __init__(self, ctx: zmq.Context[Any], curve: ServerCurve) -> None:
        self.curve = curve
        self._ctx = ctx
        self._auth = ThreadAuthenticator(ctx, log=_quiet_logger())
        self._auth.start()
        self._extra_keys: set[bytes] = set()
        self._keys_lock = threading.Lock()
        self._signature: tuple[Any, ...] = ()
        self._load_keys()
        self._refused = 0
        self._lock = threading.Lock()
        self._monitors: list[threading.Thread] = []
        self._stop = threading.Event()
        self._stopped = False
        # Workers have no reload hook of their own (SIGHUP belongs to their plugins), so every
        # process watches the folder: a key added or removed takes effect within a second.
        self._watcher = threading.Thread(target=self._watch_keys, name="auth-keys", daemon=True)
        self._watcher.start()

    @property
    def refused(self) -> int:
        """Handshakes refused so far (a client that keeps retrying counts every attempt)."""
        with self._lock:
            return self._refused

    def _folder_signature(self) -> tuple[Any, ...]:
        folder = self.curve.authorized_keys
        try:
            entries = sorted(
                (e.name, e.stat().st_mtime_ns, e.stat().st_size)
                for e in os.scandir(folder)
                if e.name.endswith(".key")
            )
        except OSError:
            return ()
        return tuple(entries)

    def _load_keys(self) -> None:
        folder = self.curve.authorized_keys
        if not os.path.isdir(folder):
            raise ConfigError("curve_authorized_keys", f"{folder} is not a folder")
        with self._keys_lock:
            self._signature = self._folder_signature()
            certs = dict(zmq.auth.load_certificates(folder))
            for key in self._extra_keys:
                certs[key] = True
            # One assignment: the ZAP thread sees the old allow-list or the new one, never a
            # half-built one.
            self._auth.certs[ZAP_DOMAIN] = certs
        log.info("CURVE allow-list loaded", authorized_keys=folder, clients=len(certs))

    def _watch_keys(self) -> None:
        while not self._stop.wait(self.WATCH_INTERVAL_S):
            if self._folder_signature() != self._signature:
                try:
                    self._load_keys()
                except Exception as exc:  # a half-written key file: try again next time
                    log.warning("CURVE allow-list reload failed", error=str(exc))

    @property
    def authorized_count(self) -> int:
        """Client keys admitted now (from the folder, plus keys added with authorize())."""
        return len(self._auth.certs.get(ZAP_DOMAIN, {}))

    def authorize(self, public_key: bytes) -> None:
        """Admit one more public key (z85), kept across reloads: the daemon's own processes."""
        with self._keys_lock:
            self._extra_keys.add(public_key)
            certs = dict(self._auth.certs.get(ZAP_DOMAIN, {}))
            certs[public_key] = True
            self._auth.certs[ZAP_DOMAIN] = certs

    def reload(self) -> None:
        """Re-read the authorised client keys (new files admitted, removed ones refused)."""
        self._load_keys()

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server checked by this guard, and count its refusals."""
        sock.curve_secretkey = self.curve.secret
        sock.curve_publickey = self.curve.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()
        monitor = sock.get_monitor_socket(REFUSAL_EVENTS)
        t = threading.Thread(
            target=self._count_refusals, args=(monitor,), name="auth-monitor", daemon=True
        )
        self._monitors.append(t)
        t.start()

    def _count_refusals(self, monitor: zmq.Socket[Any]) -> None:
        try:
            while not self._stop.is_set():
                if not monitor.poll(200):
                    continue
                event = parse_monitor_message(monitor.recv_multipart())
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                if event["event"] & REFUSAL_EVENTS:
                    with self._lock:
                        self._refused += 1
                    # The endpoint is the listening address; no key material is logged.
                    log.warning(
                        "refused a connection without valid credentials",
                        endpoint=event.get("endpoint", b"").decode(errors="replace"),
                        reason=_reason(event["event"]),
                    )
        except zmq.ZMQError:
            return  # the context is terminating
        finally:
            monitor.close(linger=0)

    def stop(self) -> None:
        """Stop the ZAP handler and the monitor threads. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._watcher.join(timeout=2 * self.WATCH_INTERVAL_S + 1)
        for t in self._monitors:
            t.join(timeout=2)
        self._auth.stop()


def _reason(event: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "client key not authorised"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return "no or wrong CURVE credentials"
    return "handshake failed"


def _quiet_logger() -> Any:
    import logging

    # pyzmq's authenticator logs every decision with client keys at DEBUG; keep it out of ours.
    logger = logging.getLogger("lmcached.zap")
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    return logger


# ---------------------------------------------------------------------------------------------
# Client side.
# ---------------------------------------------------------------------------------------------

CLIENT_KEY_ENV = "LMCACHED_CURVE_CLIENT_KEY_FILE"
SERVER_KEY_ENV = "LMCACHED_CURVE_SERVER_KEY_FILE"


@dataclass(frozen=True)
class ClientCurve:
    """A client's CURVE credentials: its key pair and the daemon's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def load(
        cls,
        client_key_file: str | None = None,
        server_key_file: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientCurve | None:
        """Load credentials from the arguments, else LMCACHED_CURVE_*_KEY_FILE; None if neither."""
        env = os.environ if environ is None else environ
        client_key_file = client_key_file or env.get(CLIENT_KEY_ENV) or None
        server_key_file = server_key_file or env.get(SERVER_KEY_ENV) or None
        if not client_key_file and not server_key_file:
            return None
        if not client_key_file or not server_key_file:
            missing = "curve_client_key_file" if not client_key_file else "curve_server_key_file"
            raise ConfigError(missing, "CURVE needs both the client key pair and the server key")
        public, secret = load_secret_certificate(client_key_file, "curve_client_key_file")
        server_public = load_public_key(server_key_file, "curve_server_key_file")
        return cls(public, secret, server_public)

    @classmethod
    def from_config(cls, cfg: Any, environ: Mapping[str, str] | None = None) -> ClientCurve | None:
        """Load from the config's curve_client_* keys or the env; else, on the daemon's host,
        use the daemon's own key pair when it is readable (an admin running `lmcached status`
        as the service user), which every lmcached process admits.
        """
        found = cls.load(cfg.curve_client_key_file, cfg.curve_server_key_file, environ)
        if found is not None:
            return found
        own = cfg.curve_secret_key_file
        if not own or not os.access(own, os.R_OK):
            # A daemon with enable_tcp and no keys of its own generated them into its folder.
            own = readable_generated_certificate(cfg.instance_dir)
        if not own:
            return None
        return cls.own_daemon(own)

    @classmethod
    def own_daemon(cls, secret_file: str) -> ClientCurve:
        """Use the daemon's own key pair (every lmcached process admits it)."""
        public, secret = load_secret_certificate(secret_file, "curve_secret_key_file")
        return cls(public, secret, public)

    @classmethod
    def beside_ipc(cls, endpoint: str) -> ClientCurve | None:
        """For an ``ipc://<instance>/control.sock`` endpoint: the daemon's generated pair, if
        this process may read it (it may then use the sockets beside it anyway)."""
        path = ipc_path(endpoint)
        if path is None:
            return None
        own = readable_generated_certificate(os.path.dirname(path))
        return cls.own_daemon(own) if own else None

    def apply(self, sock: zmq.Socket[Any]) -> None:
        """Set the CURVE client options on ``sock``; call before connect()."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public

    def __repr__(self) -> str:
        return f"ClientCurve(public={self.public.decode()!r})"


# ---------------------------------------------------------------------------------------------
# Socket and shared-memory permissions.
# ---------------------------------------------------------------------------------------------


def resolve_group(name: str | None) -> int:
    """Return the gid of ``name``, or the process's own group when None."""
    if name is None:
        return os.getegid()
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError("socket_group", f"no group named {name!r} on this host") from None


def restrict_to_group(path: str, gid: int) -> None:
    """Give ``path`` (an ipc socket, a shared-memory file) mode 0660 and group ``gid``.

    Members of the group (an engine's service user) may connect; nobody else may.
    """
    if gid != os.stat(path).st_gid:
        os.chown(path, -1, gid)
    os.chmod(path, 0o660)


def secure_ipc_socket(endpoint: str, group: str | None) -> None:
    """Apply mode 0660 and ``socket_group`` (default: the daemon's group) to an ipc endpoint."""
    path = ipc_path(endpoint)
    if path is not None:
        restrict_to_group(path, resolve_group(group))


def share_with_group(path: str | os.PathLike[str], group: str | None, mode: int) -> None:
    """Give ``path`` group ``socket_group`` and ``mode``, so that group's members can reach it.

    Called on the instance folder when it is created (0750) and on endpoints.json before it is
    renamed into place (0640): a reader never sees the published file before it is shared. The
    sockets alone are not enough, because a client must traverse the folder and read the
    endpoints file to find the daemon (``lmcached status --config ...``).
    """
    if group is None:
        return  # the files already belong to the daemon's own group
    gid = resolve_group(group)
    if os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)
    os.chmod(path, mode)


def ipc_path(endpoint: str) -> str | None:
    """Return the file path of an ``ipc://`` endpoint, else None."""
    if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
        return endpoint[len("ipc://") :]
    return None
