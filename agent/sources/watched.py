"""A file parsed into a value and parsed again when it changes (the lab's cluster state, the CA's token and pod
files, the trust bundle). Parsers raise ValueError (or OSError) for what they cannot take."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class SourceError(Exception):
    """A file cannot be read or parsed, and there is no earlier good version to keep using."""




class WatchedFile(Generic[T]):
    """A file parsed into ``T`` and parsed again whenever it changes (mtime, size or inode).

    A file that becomes unparsable keeps the last good version in use (editors write files in several
    steps); a missing file is an error, so deleting the token file revokes every token.
    """

    def __init__(self, path: Path, parse: Callable[[bytes], T], what: str) -> None:
        self.path = path
        self._parse = parse
        self._what = what
        self._signature: tuple[int, int, int, int] | None = None
        self._loaded: tuple[T] | None = None  # a 1-tuple, so that a parsed value may itself be falsy

    def get(self) -> T:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise SourceError(f"cannot read {self._what} {self.path}: {e.strerror}") from None
        signature = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        if signature != self._signature or self._loaded is None:
            self._signature = signature
            try:
                self._loaded = (self._parse(self.path.read_bytes()),)
                log.info("loaded %s %s", self._what, self.path)
            except (OSError, ValueError) as e:
                if self._loaded is None:
                    raise SourceError(f"cannot load {self._what} {self.path}: {e}") from None
                log.error("cannot load %s %s, keeping the previous version: %s", self._what, self.path, e)
        return self._loaded[0]
