"""The flow ring: overwrite counting, lost-event markers, followers (bounded, cross-thread, never silent)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.telemetry.model import (
    Direction,
    Endpoint,
    EventType,
    Flow,
    LostEvent,
    LostSource,
    PendingFlow,
    Reporter,
    Verdict,
)
from agent.telemetry.ring import FlowRing


def flow(i: int, port: int = 80) -> Flow:
    return Flow(1_000 + i, f"uuid-{i}", Verdict.FORWARDED, EventType.START, Direction.EGRESS, Reporter.SOURCE,
                "node-1", Endpoint("10.0.0.1", 40000 + i), Endpoint("10.0.0.2", port))


class Builder:
    """Builds a pending flow from its sequence number, counting how many it built."""

    def __init__(self) -> None:
        self.built = 0

    def build(self, pending: PendingFlow) -> Flow:
        self.built += 1
        return flow(pending[2])

    def pending(self, *numbers: int) -> list[PendingFlow]:
        return [(self, b"", i, Endpoint("10.0.0.1", 0), Endpoint("10.0.0.2", 0)) for i in numbers]


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        FlowRing(0)


def test_keeps_last_n_and_counts_overwrites() -> None:
    ring = FlowRing(4)
    for i in range(10):
        ring.write(flow(i))
    snap = ring.snapshot()
    assert [e.uuid for e in snap.entries if isinstance(e, Flow)] == ["uuid-6", "uuid-7", "uuid-8", "uuid-9"]
    assert (ring.num_flows, ring.seen, ring.evicted, snap.evicted) == (4, 10, 6, 6)
    assert snap.oldest_ns == 1_006


def test_lost_markers_stay_in_place_and_count() -> None:
    ring = FlowRing(4)
    ring.write(flow(0))
    ring.write(LostEvent(1_001, LostSource.PERF_EVENT_RING_BUFFER, 7))
    ring.write(flow(2))
    entries = ring.snapshot().entries
    assert isinstance(entries[1], LostEvent) and entries[1].count == 7
    assert ring.lost == 7 and ring.num_flows == 2 and ring.seen == 2
    for i in range(3, 7):  # the marker is overwritten like any entry, but is not an overwritten flow
        ring.write(flow(i))
    assert ring.num_flows == 4 and ring.evicted == 2


def test_pending_flows_count_as_flows_and_are_built_once_when_read() -> None:
    ring, builder = FlowRing(4), Builder()
    ring.write(flow(0))
    ring.write_pending(builder.pending(1, 2))
    ring.write(LostEvent(1_003, LostSource.PERF_EVENT_RING_BUFFER, 5))
    assert (ring.num_flows, ring.seen, ring.evicted, builder.built) == (3, 3, 0, 0)
    ring.write_pending(builder.pending(4, 5, 6))  # overwrites flow 0, pending 1 and 2 (not the marker: it is newer)
    assert (ring.num_flows, ring.seen, ring.evicted, builder.built) == (3, 6, 3, 0)
    first = ring.snapshot()
    assert [e.uuid if isinstance(e, Flow) else e.count for e in first.entries] == [5, "uuid-4", "uuid-5", "uuid-6"]
    assert builder.built == 3 and first.evicted == 3
    again = ring.snapshot()
    assert builder.built == 3 and all(a is b for a, b in zip(first.entries, again.entries, strict=True))
    ring.write_pending(builder.pending(7) * 5)  # more than the ring holds: the marker and four flows go
    assert (ring.num_flows, ring.seen, ring.evicted, ring.lost) == (4, 11, 7, 5)


async def test_pending_flows_are_built_at_once_for_a_follower_and_filtered() -> None:
    ring, builder = FlowRing(8), Builder()
    ring.write_pending(builder.pending(0))
    snap, follower = ring.follow(lambda f: f.source.port % 2 == 0)  # the entries it starts from are built
    assert [e.uuid for e in snap.entries if isinstance(e, Flow)] == ["uuid-0"] and builder.built == 1
    ring.write_pending(builder.pending(1, 2))
    assert builder.built == 3
    got = await asyncio.wait_for(follower.get(), 2)
    assert [e.uuid for e in got if isinstance(e, Flow)] == ["uuid-2"]
    assert ring.snapshot().entries[1:] == [flow(1), flow(2)] and builder.built == 3  # kept built
    follower.close()


async def test_follower_gets_new_entries_exactly_once() -> None:
    ring = FlowRing(8)
    ring.write(flow(0))
    snap, follower = ring.follow(lambda f: f.destination.port == 80)
    assert [e.uuid for e in snap.entries if isinstance(e, Flow)] == ["uuid-0"]
    ring.write(flow(1))
    ring.write(flow(2, port=443))  # filtered out at the writer
    ring.write(flow(3))
    got = await asyncio.wait_for(follower.get(), 2)
    assert [e.uuid for e in got if isinstance(e, Flow)] == ["uuid-1", "uuid-3"]
    follower.close()
    assert ring.followers == 0
    ring.write(flow(4))  # nobody left to push to


async def test_slow_follower_is_told_how_many_it_lost() -> None:
    ring = FlowRing(100)
    _snap, follower = ring.follow(lambda f: True, maxsize=3)
    for i in range(10):
        ring.write(flow(i))
    got = await asyncio.wait_for(follower.get(), 2)
    assert [e.uuid for e in got if isinstance(e, Flow)] == ["uuid-0", "uuid-1", "uuid-2"]
    lost = got[-1]
    assert isinstance(lost, LostEvent)
    assert (lost.source, lost.count) == (LostSource.OBSERVER_EVENTS_QUEUE, 7)
    assert ring.lost == 7
    ring.write(flow(10))
    got = await asyncio.wait_for(follower.get(), 2)
    assert [e.uuid if isinstance(e, Flow) else "lost" for e in got] == ["uuid-10"]  # recovered, nothing lost
    follower.close()


async def test_writers_on_other_threads_wake_the_follower() -> None:
    ring = FlowRing(10_000)
    _snap, follower = ring.follow(lambda f: True, maxsize=10_000)

    def write(base: int) -> None:
        for i in range(500):
            ring.write(flow(base + i))

    threads = [threading.Thread(target=write, args=(k * 1000,)) for k in range(4)]
    for t in threads:
        t.start()
    seen: list[str] = []
    while len(seen) < 2000:
        batch = await asyncio.wait_for(follower.get(), 5)
        assert not any(isinstance(e, LostEvent) for e in batch)
        seen += [e.uuid for e in batch if isinstance(e, Flow)]
    for t in threads:
        t.join()
    assert len(seen) == len(set(seen)) == 2000
    follower.close()


def test_follower_of_a_closed_loop_is_dropped() -> None:
    ring = FlowRing(10)

    async def register() -> None:
        ring.follow(lambda f: True)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(register())
    loop.close()
    t = threading.Thread(target=ring.write, args=(flow(0),))  # another thread: must go through the loop
    t.start()
    t.join()
    assert ring.followers == 0
