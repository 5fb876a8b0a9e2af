"""Files of Kubernetes objects (the lab's cluster state, the CA's pod and token files), watched for change."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

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
            except (OSError, ValueError, yaml.YAMLError) as e:
                if self._loaded is None:
                    raise SourceError(f"cannot load {self._what} {self.path}: {e}") from None
                log.error("cannot load %s %s, keeping the previous version: %s", self._what, self.path, e)
        return self._loaded[0]




def kubernetes_objects(data: bytes) -> Iterable[Any]:
    """The objects of a YAML stream: each document, with the items of a ``kind: List`` spread out."""
    for doc in yaml.safe_load_all(data):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ValueError("every YAML document must be a Kubernetes object")
        if doc.get("kind") == "List" or (doc.get("kind", "").endswith("List") and "items" in doc):
            items = doc.get("items") or []
            if not isinstance(items, list):
                raise ValueError("'items' of a List must be a sequence")
            yield from items
        else:
            yield doc
