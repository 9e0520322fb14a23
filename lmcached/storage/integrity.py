"""The integrity secret of shared tiers: read from its file, checked, turned into a MAC key.

The secret is shared by the daemons of one deployment and makes the block format's MAC (see
:mod:`lmcached.storage.blockformat`). It is read only from the file named by
``integrity_key_file``, which must be private to the daemon's user (mode 0600) or its group
(0640): a secret others can read protects nothing, so any other mode is refused.
"""

from __future__ import annotations

import hashlib
import os
import stat

ALLOWED_MODES = (0o600, 0o640)
MIN_SECRET_BYTES = 16
MAX_SECRET_FILE_BYTES = 64 * 1024


class IntegrityKeyError(ValueError):
    """The integrity key file is missing, unsafe or unusable (a one-line reason)."""


def load_integrity_key(path: str) -> bytes:
    """Return the 32-byte MAC key derived from the secret in ``path``.

    The file's contents, less surrounding whitespace, are the secret (any bytes, at least 16;
    ``openssl rand -hex 32 > key`` makes one). Raises :class:`IntegrityKeyError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise IntegrityKeyError(f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityKeyError(f"{path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode not in ALLOWED_MODES:
            raise IntegrityKeyError(
                f"{path} has mode {mode:04o}; an integrity key file must be 0600 or 0640 "
                f"(chmod 600 {path})"
            )
        if st.st_size > MAX_SECRET_FILE_BYTES:
            raise IntegrityKeyError(f"{path} is {st.st_size} bytes; a secret is far smaller")
        material = os.read(fd, MAX_SECRET_FILE_BYTES).strip()
    finally:
        os.close(fd)
    if len(material) < MIN_SECRET_BYTES:
        raise IntegrityKeyError(
            f"{path} holds {len(material)} bytes; an integrity secret needs at least "
            f"{MIN_SECRET_BYTES}"
        )
    # A fixed-size key whatever the file holds (BLAKE2b keys are at most 64 bytes).
    return hashlib.blake2b(material, digest_size=32, person=b"lmcached-ikey").digest()
