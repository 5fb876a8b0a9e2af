"""A copy-on-write map, so that publishing a snapshot of a large index costs little and the snapshot never changes.

``CowMap`` is the writer's side: a map split into shards by key hash. ``snapshot()`` hands out a ``FrozenMap``
over the current shards (a tuple of references, O(shards)) and marks every shard shared; the next write to a
shared shard copies that shard alone first. So a store that publishes after every event pays for the shards
the event touched (a few dozen entries each), not for the whole index, and a reader holding a snapshot sees
it exactly as it was published, forever.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from typing import Generic, TypeVar, overload

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")


class _ShardReads(Generic[K, V]):
    """Reads by key, the same on both sides: the key's shard is its hash's low bits."""

    __slots__ = ()
    _shards: Sequence[dict[K, V]]
    _mask: int

    def __getitem__(self, key: K) -> V:
        return self._shards[hash(key) & self._mask][key]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | T, /) -> V | T: ...

    def get(self, key: K, default: V | T | None = None, /) -> V | T | None:
        return self._shards[hash(key) & self._mask].get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._shards[hash(key) & self._mask]


class FrozenMap(_ShardReads[K, V], Mapping[K, V]):
    """A published, read-only mapping: its shards are never written again."""

    __slots__ = ("_len", "_mask", "_shards")

    def __init__(self, shards: tuple[dict[K, V], ...], length: int) -> None:
        self._shards, self._mask, self._len = shards, len(shards) - 1, length



    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def __len__(self) -> int:
        return self._len

    def values(self) -> ValuesView[V]:
        return _Values(self)

    def items(self) -> ItemsView[K, V]:
        return _Items(self)

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self.items())!r})"


class _Values(ValuesView[V]):
    _mapping: FrozenMap[object, V]

    def __iter__(self) -> Iterator[V]:  # shard by shard, without a lookup per key
        for shard in self._mapping._shards:
            yield from shard.values()


class _Items(ItemsView[K, V]):
    _mapping: FrozenMap[K, V]

    def __iter__(self) -> Iterator[tuple[K, V]]:
        for shard in self._mapping._shards:
            yield from shard.items()


class CowMap(_ShardReads[K, V]):
    """The writer's map: dict-like reads and writes, and ``snapshot()``."""

    __slots__ = ("_len", "_mask", "_shards", "_shared", "_snapshot")

    def __init__(self, shards: int = 64) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two, not {shards}")
        self._shards: list[dict[K, V]] = [{} for _ in range(shards)]
        self._shared = [False] * shards  # True: the shard is in a published snapshot, copy before writing
        self._mask = shards - 1
        self._len = 0
        self._snapshot: FrozenMap[K, V] | None = None



    def __len__(self) -> int:
        return self._len

    def __setitem__(self, key: K, value: V) -> None:
        shard = self._writable(key)
        if key not in shard:
            self._len += 1
        shard[key] = value

    def __delitem__(self, key: K) -> None:
        shard = self._writable(key)
        del shard[key]
        self._len -= 1

    def pop(self, key: K, default: V | None = None) -> V | None:
        if key not in self:
            return default
        self._len -= 1
        return self._writable(key).pop(key)

    def _writable(self, key: K) -> dict[K, V]:
        i = hash(key) & self._mask
        if self._shared[i]:
            self._shards[i] = dict(self._shards[i])
            self._shared[i] = False
        self._snapshot = None
        return self._shards[i]

    def snapshot(self) -> FrozenMap[K, V]:
        """The map as it is now, never to change; the same object again while nothing is written."""
        if self._snapshot is None:
            self._snapshot = FrozenMap(tuple(self._shards), self._len)
            self._shared = [True] * len(self._shards)
        return self._snapshot
