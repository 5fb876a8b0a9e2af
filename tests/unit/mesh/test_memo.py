"""StateMemo: answers kept for the state object they were derived from, and bounded."""

from __future__ import annotations

from agent.mesh.memo import StateMemo
from agent.mesh.store import MeshStore
from tests.fixtures.mesh_objects import namespace


def test_answers_last_until_the_state_changes_or_the_memo_is_full() -> None:
    store = MeshStore()
    memo: StateMemo[str, int] = StateMemo(store, limit=2)
    memo.current()["a"] = 1
    assert memo.current() == {"a": 1}
    assert store.apply([]) == [] and memo.current() == {"a": 1}  # nothing changed: the same state
    assert store.apply([namespace("shop")]) == []
    assert memo.current() == {}  # a new state
    memo.current().update(a=1, b=2)
    assert memo.current() == {}  # full: starts over
