"""Where the CA's private keys go: a directory only its owner can enter, key files only the owner can read.

A directory that already exists and that others may enter or list is refused, not tightened: it is the
user's (a home directory, a shared tmp), and changing its mode behind their back would surprise more than
the error does. A directory that is created gets mode 0700.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class KeyDirectoryError(OSError):
    """A directory unfit to hold a private key; the message says why and what to do."""


def private_directory(path: Path) -> Path:
    """Make ``path`` (0700, parents as needed), or check that the existing one is closed to other users."""
    try:
        path.mkdir(mode=0o700, parents=True)
        return path
    except FileExistsError:
        pass
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise KeyDirectoryError(f"{path} exists and is not a directory")
    if st.st_mode & 0o077:
        raise KeyDirectoryError(
            f"refusing to write a private key into {path}: other users may enter it (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); `chmod 700 {path}`, or name a directory that does not exist yet")
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write a key file readable by its owner only (created so: never world-readable, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT: set it
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)
