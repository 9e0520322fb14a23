"""One block per file: crash-safe writes (temp file + rename) and verified reads.

Shared by the disk tier and the ``fs://`` remote connector, so both write the same
self-describing files (docs/format.md). A file is either absent or complete: it is written under
a temporary name and renamed into place, and rename is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Sequence

import xxhash

from lmcached.storage.base import Block, Buffer
from lmcached.storage.blockformat import (
    HEADER_PROBE,
    BlockFormatError,
    BlockHeader,
    decode_block,
    decode_header,
    encode_block,
    header_length,
)

BLOCK_SUFFIX = ".blk"
TEMP_PREFIX = ".tmp-"
_temp_counter = itertools.count()
_temp_lock = threading.Lock()


def file_name(key: bytes) -> str:
    """Return the file name of ``key``: a stable 128-bit hash, so any key length is safe."""
    return xxhash.xxh3_128_hexdigest(key) + BLOCK_SUFFIX


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def _write_all(fd: int, pieces: Sequence[Buffer]) -> None:
    views = [memoryview(p).cast("B") for p in pieces]
    views = [v for v in views if v.nbytes]
    while views:
        # writev may write less than asked (signals, large counts); resume where it stopped.
        n = os.writev(fd, views[:1024])
        while n and views:
            if n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0


def fsync_dir(directory: str) -> None:
    """Persist a rename: fsync the folder that holds the entry."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(
    directory: str,
    name: str,
    pieces: Sequence[Buffer],
    *,
    fsync: bool = False,
    drop_cache: bool = False,
) -> tuple[str, int]:
    """Write ``pieces`` as ``<directory>/<name>`` atomically; return (path, size).

    On any error the temporary file is removed and the error propagates, so a failed write
    leaves nothing visible.
    """
    size = sum(memoryview(p).nbytes for p in pieces)
    with _temp_lock:
        n = next(_temp_counter)
    tmp = os.path.join(directory, f"{TEMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{n}")
    final = os.path.join(directory, name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            _write_all(fd, pieces)
            if fsync or drop_cache:
                # The kernel drops only clean pages: DONTNEED right after a write would keep
                # them all (measured: 100% still resident), so dropping implies a data sync.
                # This runs on the write-through thread, never on the request loop.
                os.fdatasync(fd)
            if drop_cache:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(directory)
    return final, size


def write_block_file(
    directory: str,
    key: bytes,
    block: Block,
    *,
    fsync: bool = False,
    drop_cache: bool = False,
) -> tuple[str, int]:
    """Write ``block`` as ``<directory>/<file_name(key)>`` atomically; return (path, file size)."""
    return write_file_atomic(
        directory, file_name(key), encode_block(key, block), fsync=fsync, drop_cache=drop_cache
    )


class FileTooLarge(OSError):
    """A file is larger than the reader's cap (a value no lmcached writer could have made)."""


def read_file(
    path: str,
    *,
    drop_cache: bool = False,
    use_mmap: bool = False,
    max_bytes: int | None = None,
) -> memoryview:
    """Return a private copy of a whole file's bytes.

    Always a copy into memory this process owns, never a mapping: bytes are verified once and
    then served from memory, so they must not change after verification (a mapped file edited
    underneath would reach clients unverified, and a truncated one would SIGBUS the worker).
    ``use_mmap`` is accepted for compatibility and ignored. A file larger than ``max_bytes``
    raises :class:`FileTooLarge` before anything is read.
    """
    del use_mmap
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise FileTooLarge(f"{path} holds {size} bytes, more than the cap of {max_bytes}")
        # One copy, kernel to a buffer we own; the payload is then a view of it. A file that
        # shrinks meanwhile gives a short read (then "truncated"); one that grows is cut at
        # ``size`` and then fails its length check.
        buf = bytearray(size)
        mv = memoryview(buf)
        got = 0
        while got < size:
            n = os.preadv(fd, [mv[got:]], got)
            if n == 0:
                break
            got += n
        if got == size and os.pread(fd, 1, size):
            got = size + 1  # grew while read: report it as a length mismatch, never a prefix
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if got > size:
        raise BlockFormatError("bad_header", f"{path} grew while it was read")
    return mv[:got]


def read_block_file(
    path: str,
    key: bytes | None = None,
    *,
    drop_cache: bool = False,
    use_mmap: bool = False,
    max_bytes: int | None = None,
) -> Block:
    """Read and verify one block file; raise BlockFormatError or OSError (FileNotFoundError).

    The returned Block views a private copy of the file (see :func:`read_file`).
    """
    data = read_file(path, drop_cache=drop_cache, max_bytes=max_bytes)
    _, block = decode_block(data, key)
    return block


def read_block_header(path: str) -> tuple[BlockHeader, int]:
    """Read and verify only the header of a block file; return it and the file's size."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_PROBE)
        need = header_length(head)
        if need > len(head):
            head += f.read(need - len(head))
    header = decode_header(head)
    if size != header.total_len:
        raise BlockFormatError(
            "truncated", f"file holds {size} bytes, its header announces {header.total_len}"
        )
    return header, size
