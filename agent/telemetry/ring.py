"""The last N flows of a node, and the readers following new ones.

``FlowRing`` keeps the most recent ``capacity`` entries (flows, and markers of lost events in time order,
as Hubble keeps LostEvents in its ring). Overwritten flows are counted. The kernel's events are written as they
came (``write_pending``: a ``PendingFlow`` each), as are the proxies' connection starts and ends, and become
flows when read: a snapshot, a new follower, or a write while someone follows builds them, once.
Writers may be on any thread: one lock guards the ring.

A ``Follower`` is a reader that receives each new entry its predicate accepts, through a bounded queue. A
follower that falls behind loses entries, and the next thing it reads says how many (a LostEvent from
OBSERVER_EVENTS_QUEUE): never silent. Taking a snapshot and registering a follower happen under the same
lock, so a reader that follows sees every flow exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from agent.telemetry.model import Entry, Flow, LostEvent, LostSource, PendingFlow

Predicate = Callable[[Flow], bool]
DEFAULT_FOLLOWER_QUEUE = 4096
Stored = Entry | PendingFlow


def built(entry: Stored) -> Entry:
    return entry[0].build(entry) if isinstance(entry, tuple) else entry


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The ring's entries at one moment, oldest first, and how many flows had been overwritten before them."""

    entries: list[Entry]
    evicted: int

    @property
    def oldest_ns(self) -> int | None:
        return self.entries[0].time_ns if self.entries else None


class Follower:
    """New entries for one reader, bounded; wake-ups cross threads safely."""

    def __init__(self, ring: FlowRing, predicate: Predicate, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._ring = ring
        self._predicate = predicate
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._maxsize = maxsize
        self._items: collections.deque[Entry] = collections.deque()
        self._lost = 0
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._wake_pending = False
        self.closed = False

    def push(self, entry: Entry) -> bool:
        """From the writer (any thread, the ring's lock held). False when this follower's loop is gone."""
        if isinstance(entry, Flow) and not self._predicate(entry):
            return True
        same_thread = threading.get_ident() == self._loop_thread
        with self._lock:
            if len(self._items) >= self._maxsize:
                self._lost += 1 if isinstance(entry, Flow) else entry.count
                if isinstance(entry, Flow):
                    self._ring.lost += 1  # (markers were counted when written)
            else:
                self._items.append(entry)
            wake = same_thread or not self._wake_pending
            if wake and not same_thread:
                self._wake_pending = True
        if not wake:
            return True
        if same_thread:
            self._ready.set()
            return True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the reader's loop is closed: nobody will read
            self.closed = True
            return False
        return True

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def get(self) -> list[Entry]:
        """Wait for new entries; a LostEvent at the end says how many did not fit in the queue."""
        while True:
            with self._lock:
                self._ready.clear()
                batch = list(self._items)
                self._items.clear()
                lost, self._lost = self._lost, 0
            if lost:
                batch.append(LostEvent(time.time_ns(), LostSource.OBSERVER_EVENTS_QUEUE, lost))
            if batch:
                return batch
            await self._ready.wait()

    def close(self) -> None:
        self._ring.unfollow(self)


class FlowRing:
    """The most recent ``capacity`` entries. Thread-safe."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError(f"flow buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: collections.deque[Stored] = collections.deque()
        self._unbuilt = False  # pending flows among the entries
        self._lock = threading.Lock()
        self._followers: list[Follower] = []
        self._flows = 0  # flows in the ring now
        self.seen = 0  # flows ever written
        self.evicted = 0  # flows overwritten
        self.lost = 0  # events lost before the ring (kernel) or before a follower (queue full)
        self._held: Callable[[], None] | None = None  # writes a writer holds back (``writes_held_by``)

    def writes_held_by(self, catch_up: Callable[[], None]) -> None:
        """A writer holds writes back (a batch at a time): ``catch_up`` writes them, before anyone reads."""
        self._held = catch_up

    def catch_up(self) -> None:
        """Have the held-back writes written (outside the lock: they take it): every read starts here."""
        if self._held is not None:
            self._held()

    def write(self, entry: Entry) -> None:
        """Append a flow or a lost-events marker, overwriting the oldest entry when full."""
        with self._lock:
            self._append(entry)

    def write_pending(self, pending: list[PendingFlow]) -> None:
        """Append flows kept as they came (kernel events, connections' starts and ends), built only when read (at
        once when someone follows)."""
        with self._lock:
            if self._followers:
                for p in pending:
                    self._append(p[0].build(p))
                return
            entries = self._entries
            entries.extend(pending)
            self._unbuilt = True
            self._flows += len(pending)
            self.seen += len(pending)
            for _ in range(len(entries) - self.capacity):
                if not isinstance(entries.popleft(), LostEvent):
                    self._flows -= 1
                    self.evicted += 1

    def _append(self, entry: Entry) -> None:
        """Under the lock."""
        entries = self._entries
        if len(entries) >= self.capacity and not isinstance(entries.popleft(), LostEvent):
            self._flows -= 1
            self.evicted += 1
        entries.append(entry)
        if isinstance(entry, Flow):
            self._flows += 1
            self.seen += 1
        else:
            self.lost += entry.count
        if self._followers:
            for follower in [f for f in self._followers if not f.push(entry)]:
                self._followers.remove(follower)

    def _build(self) -> list[Entry]:
        """Under the lock: every entry, pending flows built (and kept built)."""
        if not self._unbuilt:
            return cast("list[Entry]", list(self._entries))  # (none is pending)
        entries = [built(e) for e in self._entries]
        self._entries = collections.deque(entries)
        self._unbuilt = False
        return entries

    @property
    def num_flows(self) -> int:
        return self._flows

    def snapshot(self) -> Snapshot:
        self.catch_up()
        with self._lock:
            return Snapshot(self._build(), self.evicted)

    def follow(self, predicate: Predicate, maxsize: int = DEFAULT_FOLLOWER_QUEUE) -> tuple[Snapshot, Follower]:
        """The current entries and a follower that gets every later one (call on the reader's event loop)."""
        follower = Follower(self, predicate, asyncio.get_running_loop(), maxsize)
        self.catch_up()
        with self._lock:
            self._followers.append(follower)
            return Snapshot(self._build(), self.evicted), follower

    def unfollow(self, follower: Follower) -> None:
        with self._lock:
            follower.closed = True
            if follower in self._followers:
                self._followers.remove(follower)

    @property
    def followers(self) -> int:
        return len(self._followers)
