"""Creating a shared-memory file and mapping it: what a worker's arena and a client's staging
file both do, with the same care (no symlink followed, no file left behind on failure)."""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable


def create_mapped(path: str, size: int, mode: int, set_group: Callable[[int], None]) -> mmap.mmap:
    """Create ``path`` (it must not exist) with ``mode``, ``size`` bytes long, and map it shared.

    ``set_group(fd)`` runs first, so the file has its group before anyone can map it. On any
    failure the file is removed and the error raised.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        set_group(fd)
        os.fchmod(fd, mode)  # os.open applied the umask; the readers need the mode as asked
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)
