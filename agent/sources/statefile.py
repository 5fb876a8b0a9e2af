"""The lab's cluster state: a file of Kubernetes objects feeding the agent's store."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from agent.mesh.store import MeshStore
from agent.sources.objectfile import kubernetes_objects
from agent.sources.watched import SourceError, WatchedFile

log = logging.getLogger(__name__)


class StateFile:
    """Feeds a store from the lab's state file (Kubernetes objects), re-read whenever it changes.

    Only the objects that differ from the store's reach it (``MeshStore.replace_all``). A file that cannot
    be read or parsed is reported and the last good state stays in force; an object the mesh cannot take is
    reported and left out while the rest applies, as with the Kubernetes source.
    """

    def __init__(self, path: Path, store: MeshStore, interval: float = 0.1) -> None:
        self._file = WatchedFile(path, lambda data: list(kubernetes_objects(data)), "cluster state")
        self.store = store
        self.interval = interval
        self._applied: list[Any] | None = None

    def load(self) -> None:
        objects = self._file.get()
        if objects is self._applied:
            return
        self._applied = objects
        for error in self.store.replace_all(objects):
            log.error("cluster state %s: %s", self._file.path, error)

    async def watch(self) -> None:
        while True:
            try:
                self.load()
            except SourceError as e:
                log.error("%s", e)
            await asyncio.sleep(self.interval)
