"""Values derived from the mesh state, remembered until it changes.

The data path asks the same questions of every connection (which Service serves this pod's port, what this
pod's flows say of it, where this source goes for that destination); the answers depend only on the state, and
the store publishes a new ``MeshState`` object on every change. A ``StateMemo`` keeps answers for the state
object they were derived from: the first read after a change starts afresh, so nothing stale is ever served
and nothing needs invalidating. It is bounded (past ``limit`` entries it starts over too).
"""

from __future__ import annotations

from typing import Generic, TypeVar

from agent.mesh.store import MeshState, MeshStore

K = TypeVar("K")
V = TypeVar("V")

MEMO_LIMIT = 4096


class StateMemo(Generic[K, V]):
    """``current()`` is the dict of answers for the store's state now; callers fill it."""

    __slots__ = ("_answers", "_for", "_limit", "_store")

    def __init__(self, store: MeshStore, limit: int = MEMO_LIMIT) -> None:
        self._store = store
        self._limit = limit
        self._for: MeshState | None = None
        self._answers: dict[K, V] = {}

    def current(self) -> dict[K, V]:
        state = self._store.state
        if state is not self._for or len(self._answers) >= self._limit:
            self._for, self._answers = state, {}
        return self._answers
