"""The C library's functions that Python's standard library does not wrap, by name."""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

__all__ = ["glibc_function"]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # musl and other libcs: no glibc, none of its extras
        return None


def glibc_function(name: str) -> Any:
    """The C library's function ``name``; None off Linux or where this libc lacks it.

    glibc is opened by its soname, never through ``ctypes.util.find_library``: that forks
    ``ldconfig``, and a worker killed meanwhile leaves the child to the scheduler, its subreaper,
    as a zombie nobody reaps (the orphan sweep reaps only plugin processes). Errors are kept in
    ``ctypes.get_errno()``.
    """
    lib = _glibc()
    return None if lib is None else getattr(lib, name, None)
