"""Find script plugins: which files are plugins, which process runs each, and with what interpreter.

Pure functions over the file system, with no processes and no threads, so that every filename,
role and shebang rule can be read (and tested) in one place. :mod:`lmcached.supervision.launcher`
runs what this module finds.

The rules:

- A location is a folder (scanned at its top level only, in sorted order) or a single file. A
  missing location is a warning; an insecure one (world-writable, or owned by another non-root
  user) is refused unless ``allow_insecure_plugin_locations`` is set.
- Hidden files, editor backups, ``__pycache__`` and anything that is not a regular file are
  skipped. A file is a plugin if it ends in ``.py`` or ``.sh`` or starts with ``#!``.
- The file name's stem, split on ``_``, picks the processes (role names are case-insensitive):
  ``scheduler_*`` the scheduler; ``worker_*`` every worker; ``worker_<N>_*`` and ``worker_<N>``
  worker N only; ``all_*`` and any stem whose first word is not a role, every process.
- A shebang is honoured like an exec would, except that its arguments are split on whitespace
  (as macOS and the BSDs do; Linux passes them as one argument) so that
  ``#!/usr/bin/env python3 -u`` works. Without one, ``.py`` runs with ``sys.executable`` and
  ``.sh`` with ``bash``. The file need not be executable.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lmcached.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lmcached.config import Config

# Shebang lines longer than this are cut, like the kernel cuts them (BINPRM_BUF_SIZE is 256).
_SHEBANG_MAX = 256
_BACKUP_SUFFIXES = (".swp", ".swo", ".swx", ".bak", ".orig", ".rej", ".tmp", ".pyc", ".dpkg-new")
_WORKER_ID = re.compile(r"^[0-9]+$")

SCHEDULER = "SCHEDULER"
WORKER = "WORKER"


@dataclass(frozen=True)
class Target:
    """Which processes run a plugin: the scheduler, and all workers or one worker id."""

    scheduler: bool
    workers: bool
    worker_id: int | None = None  # only with workers=True: that worker alone

    def selects(self, role: str, worker_id: int) -> bool:
        """Return True when the process with this role (and worker id) runs the plugin."""
        if role == SCHEDULER:
            return self.scheduler
        if not self.workers:
            return False
        return self.worker_id is None or self.worker_id == worker_id

    def describe(self) -> str:
        if self.scheduler and self.workers:
            return "all"
        if self.scheduler:
            return "scheduler"
        return "workers" if self.worker_id is None else f"worker {self.worker_id}"


class InterpreterError(Exception):
    """A plugin's interpreter cannot be found or its shebang cannot be read."""


@dataclass(frozen=True)
class PluginFile:
    """One plugin file found in the plugin locations, with the processes that run it."""

    name: str  # the file name; identifies the plugin in status, logs and plugin_config
    path: str  # resolved real path
    target: Target
    fingerprint: str  # content hash: a changed file restarts on reload


@dataclass
class ScanResult:
    """What a scan found, and what it skipped or refused (with reasons to log)."""

    plugins: list[PluginFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    debug: list[str] = field(default_factory=list)


def target_for(name: str) -> Target:
    """Return the processes that run the plugin file called ``name`` (rules in module doc)."""
    # Only the last extension is dropped ("a.b.sh" -> "a.b"), like Path.stem.
    stem = os.path.splitext(name)[0]
    parts = stem.split("_")
    role = parts[0].lower()
    if role == "scheduler":
        return Target(scheduler=True, workers=False)
    if role == "worker":
        if len(parts) >= 2 and _WORKER_ID.match(parts[1]):
            return Target(scheduler=False, workers=True, worker_id=int(parts[1]))
        return Target(scheduler=False, workers=True)
    # "all_*", and any file whose first word is not a role, run everywhere (as the seed says).
    return Target(scheduler=True, workers=True)


def _skip_reason(name: str) -> str | None:
    if name.startswith("."):
        return "hidden file"
    if name == "__pycache__":
        return "bytecode cache"
    if name.endswith("~") or (name.startswith("#") and name.endswith("#")):
        return "editor backup"
    if name.endswith(_BACKUP_SUFFIXES):
        return "editor backup or temporary file"
    return None


def read_shebang(path: str) -> list[str] | None:
    """Return the shebang's interpreter and arguments, or None when the file has no shebang."""
    with open(path, "rb") as f:
        head = f.read(_SHEBANG_MAX)
    if not head.startswith(b"#!"):
        return None
    line = head[2:].split(b"\n", 1)[0].rstrip(b"\r")
    try:
        text = line.decode()
    except UnicodeDecodeError:
        raise InterpreterError(f"shebang of {path} is not valid UTF-8: {line!r}") from None
    words = text.split()
    if not words:
        raise InterpreterError(f"{path} has an empty shebang line")
    return words


def _is_plugin_file(path: str, name: str) -> bool:
    if name.endswith((".py", ".sh")):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def interpreter_command(path: str) -> list[str]:
    """Return the argv prefix that runs the plugin at ``path``; raise InterpreterError if missing.

    The returned command is complete: the file's path is its last element.
    """
    words = read_shebang(path)
    if words is None:
        if path.endswith(".py"):
            return [sys.executable, path]
        if path.endswith(".sh"):
            bash = shutil.which("bash")
            if bash is None:
                raise InterpreterError("interpreter 'bash' (for .sh files) not found on PATH")
            return [bash, path]
        raise InterpreterError(f"{path} has neither a shebang nor a .py/.sh extension")
    interpreter = words[0]
    if not os.path.isabs(interpreter):
        # The kernel resolves a relative interpreter against the cwd; that depends on where the
        # daemon happens to run, so refuse it with a sentence instead.
        raise InterpreterError(f"interpreter '{interpreter}' is not an absolute path")
    if not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
        raise InterpreterError(f"interpreter '{interpreter}' not found or not executable")
    if os.path.basename(interpreter) == "env":
        program = next((w for w in words[1:] if not w.startswith("-")), None)
        if program is not None and "=" not in program and shutil.which(program) is None:
            raise InterpreterError(f"interpreter '{program}' (via {interpreter}) not found on PATH")
    return [*words, path]


def insecure_location_reason(location: str) -> str | None:
    """Return why someone else could write plugins into ``location``, or None when it is safe.

    A folder (or a single file's parent folder, and the file itself) must not be world-writable
    and must be owned by root or by the user the daemon runs as. A missing path is not insecure.
    """
    try:
        st = os.stat(location)
    except OSError:
        return None
    paths = [location]
    if stat.S_ISREG(st.st_mode):
        paths.append(os.path.dirname(os.path.abspath(location)) or "/")
    me = os.geteuid()
    for p in paths:
        try:
            s = os.stat(p)
        except OSError:
            continue
        if s.st_mode & stat.S_IWOTH:
            return f"{p} is world-writable (mode {stat.S_IMODE(s.st_mode):o})"
        if s.st_uid not in (0, me):
            return f"{p} is owned by uid {s.st_uid}, not by root or the daemon's uid {me}"
    return None


def _fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def scan(locations: Iterable[str], *, allow_insecure: bool = False) -> ScanResult:
    """Return every plugin file in ``locations`` (whatever its target), in a stable order."""
    result = ScanResult()
    seen_paths: set[str] = set()
    by_name: dict[str, str] = {}
    for location in locations:
        if not os.path.exists(location):
            result.warnings.append(f"plugin location {location} does not exist; skipped")
            continue
        if not allow_insecure:
            reason = insecure_location_reason(location)
            if reason is not None:
                result.errors.append(
                    f"refusing plugin location {location}: {reason}; set "
                    "allow_insecure_plugin_locations: true to override"
                )
                continue
        if os.path.isdir(location):
            try:
                names = sorted(os.listdir(location))
            except OSError as exc:
                result.errors.append(f"cannot list plugin location {location}: {exc.strerror}")
                continue
            candidates = [(os.path.join(location, n), n) for n in names]
        else:
            candidates = [(location, os.path.basename(location))]
        for path, name in candidates:
            reason = _skip_reason(name)
            if reason is None and not os.path.isfile(path):
                reason = "not a regular file"
            if reason is None and not _is_plugin_file(path, name):
                reason = "no .py/.sh extension and no #! line"
            if reason is not None:
                result.debug.append(f"{path}: not a plugin ({reason})")
                continue
            real = os.path.realpath(path)
            if real in seen_paths:
                result.debug.append(f"{path}: same file as an earlier plugin; launched once")
                continue
            if name in by_name:
                result.warnings.append(
                    f"{path}: a different plugin named {name} was already found at "
                    f"{by_name[name]}; plugins are identified by file name, skipped"
                )
                continue
            if not allow_insecure and os.stat(real).st_mode & stat.S_IWOTH:
                result.errors.append(
                    f"refusing plugin {path}: the file is world-writable; set "
                    "allow_insecure_plugin_locations: true to override"
                )
                continue
            try:
                fingerprint = _fingerprint(real)
            except OSError as exc:
                result.errors.append(f"cannot read plugin {path}: {exc.strerror}")
                continue
            seen_paths.add(real)
            by_name[name] = path
            result.plugins.append(PluginFile(name, real, target_for(name), fingerprint))
    return result


def check_plugin_locations(cfg: Config) -> None:
    """Refuse plugin folders that someone else can write: they would run code as the daemon.

    Raises ConfigError naming ``plugin_locations`` unless ``allow_insecure_plugin_locations``
    is set. Run before script plugins start (and on reload), and by ``lmcached config check``.
    """
    if cfg.allow_insecure_plugin_locations:
        return
    for location in cfg.plugin_locations:
        reason = insecure_location_reason(location)
        if reason is not None:
            raise ConfigError(
                "plugin_locations",
                f"refusing {location}: {reason}; anyone who can write there runs code as the "
                "daemon. Fix the permissions (chmod o-w / chown) or set "
                "allow_insecure_plugin_locations: true",
                cfg.source,
            )
