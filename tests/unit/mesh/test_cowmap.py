"""The copy-on-write map behind the mesh store's snapshots: a snapshot never changes, writes copy one shard."""

from __future__ import annotations

import random

import pytest

from agent.mesh.cowmap import CowMap, FrozenMap


def test_a_snapshot_never_changes_whatever_is_written_after() -> None:
    live: CowMap[str, int] = CowMap(4)
    model: dict[str, int] = {}
    rng = random.Random(7)
    held: list[tuple[FrozenMap[str, int], dict[str, int]]] = []
    for step in range(2000):
        key = f"k{rng.randrange(60)}"
        if rng.random() < 0.3:
            assert live.pop(key) == model.pop(key, None)
        else:
            live[key] = model[key] = step
        if step % 50 == 0:
            held.append((live.snapshot(), dict(model)))
        assert len(live) == len(model) and live.get(key) == model.get(key)
    held.append((live.snapshot(), dict(model)))
    for snapshot, expected in held:
        assert dict(snapshot) == expected and snapshot == expected and len(snapshot) == len(expected)
        assert dict(snapshot.items()) == expected and sorted(snapshot.values()) == sorted(expected.values())
        assert set(snapshot.keys()) == set(expected)
        assert all(k in snapshot and snapshot[k] == v and snapshot.get(k) == v for k, v in expected.items())
        assert "absent" not in snapshot and snapshot.get("absent") is None and snapshot.get("absent", -1) == -1
        with pytest.raises(KeyError):
            snapshot["absent"]


def test_a_write_copies_only_its_shard() -> None:
    live: CowMap[int, str] = CowMap(8)
    for i in range(64):
        live[i] = str(i)
    before = live.snapshot()
    live[3] = "three"
    after = live.snapshot()
    shared = [a is b for a, b in zip(before._shards, after._shards, strict=True)]
    assert shared.count(False) == 1  # the shard holding 3 was copied, every other one is the same object
    assert (before[3], after[3]) == ("3", "three")


def test_snapshot_is_reused_while_nothing_is_written() -> None:
    live: CowMap[str, int] = CowMap()
    first = live.snapshot()
    assert live.snapshot() is first and len(first) == 0 and dict(first) == {}
    live["a"] = 1
    second = live.snapshot()
    assert second is not first and second == {"a": 1} and first == {}
    assert live.pop("missing") is None and live.snapshot() is second  # a miss writes nothing
    del live["a"]
    assert live.snapshot() == {} and second == {"a": 1}
    assert repr(second) == "FrozenMap({'a': 1})"


@pytest.mark.parametrize("shards", [0, 3, 12])
def test_shards_must_be_a_power_of_two(shards: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        CowMap(shards)
