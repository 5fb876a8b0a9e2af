"""Telemetry.watch_kernel: the eBPF events reach the recorder in batches, a slice per turn of the event loop, and
none is lost on the way."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable

from agent.mesh.store import MeshStore
from agent.telemetry.hub import Telemetry, TelemetryConfig
from agent.telemetry.kernel import KernelEvent
from agent.telemetry.kernel_pump import KERNEL_SLICE
from agent.telemetry.model import EventType, Flow, LostEvent

SYN, FIN = 0x02, 0x01


class FakeRing:
    """A KernelEventSource fed by the test: events wait until read, as in the kernel's ring buffer, and a socket
    pair is readable while they do."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[KernelEvent], None]] = []
        self._waiting: list[KernelEvent] = []
        self._ready, self._notify = socket.socketpair()
        self._ready.setblocking(False)
        self.lost_events = 0
        self.batches = 0  # reads that began a batch (the one before found the ring empty)
        self.slices: list[tuple[int, int]] = []  # (events delivered, the ticker's count then) per read
        self.ticks = 0
        self._last = 0

    def subscribe(self, callback: Callable[[KernelEvent], None]) -> None:
        self._callbacks.append(callback)

    def push(self, ev: KernelEvent) -> None:
        self._waiting.append(ev)
        self._notify.send(b"e")

    def fileno(self) -> int:
        return self._ready.fileno()

    def read_events(self, limit: int) -> int:
        batch, self._waiting = self._waiting[:limit], self._waiting[limit:]
        if batch:
            self._ready.recv(len(batch))
        self.batches += bool(batch) and self._last < limit
        self._last = len(batch)
        self.slices.append((len(batch), self.ticks))
        for ev in batch:
            for cb in self._callbacks:
                cb(ev)
        return len(batch)

    def close(self) -> None:
        self._ready.close()
        self._notify.close()


def event(port: int, flags: int) -> KernelEvent:
    return KernelEvent(time.monotonic_ns(), "10.0.0.1", port, "10.0.1.1", 80, flags, toward_pod=False, dropped=False,
                       action="redirected to the proxy on :15001", reason="", reason_code="")


def kernel_flows(telemetry: Telemetry) -> list[Flow]:
    return [e for e in telemetry.recorder.ring.snapshot().entries
            if isinstance(e, Flow) and e.event_type == EventType.KERNEL]


async def wait_for(what: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_events_arriving_one_by_one_are_read_in_batches_and_every_one_becomes_a_flow() -> None:
    telemetry = Telemetry("node-1", MeshStore(), "cluster.local", TelemetryConfig(flows=1000))
    ring = FakeRing()
    telemetry.watch_kernel(ring)
    try:
        connections = 100
        for port in range(40000, 40000 + connections):  # a SYN and a FIN per connection, ~1 ms apart
            ring.push(event(port, SYN))
            ring.push(event(port, FIN))
            await asyncio.sleep(0.001)
        await wait_for(lambda: len(kernel_flows(telemetry)) == 2 * connections)
        assert sorted(f.source.port for f in kernel_flows(telemetry)) == sorted(2 * list(range(40000, 40100)))
        flags = telemetry.metrics.series("hubble_tcp_flags")
        assert flags[("SYN", "IPv4")] == flags[("FIN", "IPv4")] == connections
        assert telemetry.metrics.series("hubble_flows_processed")[("Trace", "kernel", "FORWARDED")] == 2 * connections
        # 200 events over >= 100 ms: read in a handful of batches, not one wake-up per event
        assert 1 <= ring.batches <= 10
    finally:
        await telemetry.close()
        ring.close()


async def test_a_batch_is_read_a_slice_per_turn_of_the_loop() -> None:
    """Between two slices the loop runs everything else that is ready: a connection waits behind one slice at
    most, never behind a whole batch."""
    telemetry = Telemetry("node-1", MeshStore(), "cluster.local", TelemetryConfig(flows=1000))
    ring = FakeRing()
    telemetry.watch_kernel(ring)

    async def ticker() -> None:
        while True:
            ring.ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.ensure_future(ticker())
    try:
        for port in range(40000, 40000 + 10 * KERNEL_SLICE):
            ring.push(event(port, SYN))
        await wait_for(lambda: len(kernel_flows(telemetry)) == 10 * KERNEL_SLICE)
        read = [(n, tick) for n, tick in ring.slices if n]
        assert len(read) == 10 and all(n == KERNEL_SLICE for n, _ in read)
        ticks = [tick for _, tick in read]
        assert all(b > a for a, b in itertools.pairwise(ticks))  # the loop turned between slices
    finally:
        ticking.cancel()
        await telemetry.close()
        ring.close()


async def test_a_failing_subscriber_does_not_stop_the_reading() -> None:
    telemetry = Telemetry("node-1", MeshStore(), "cluster.local", TelemetryConfig(flows=100))
    ring = FakeRing()

    def broken(ev: KernelEvent) -> None:
        if ev.sport == 40000:
            raise RuntimeError("subscriber bug")

    ring.subscribe(broken)
    telemetry.watch_kernel(ring)
    try:
        ring.push(event(40000, SYN))
        await wait_for(lambda: ring.slices != [] and ring.slices[-1][0] == 0)
        ring.push(event(40001, SYN))
        await wait_for(lambda: [f.source.port for f in kernel_flows(telemetry)] == [40001])
    finally:
        await telemetry.close()
        ring.close()


async def test_events_the_kernel_could_not_queue_are_counted_in_place() -> None:
    telemetry = Telemetry("node-1", MeshStore(), "cluster.local", TelemetryConfig(flows=100))
    ring = FakeRing()
    telemetry.watch_kernel(ring)
    try:
        ring.push(event(40000, SYN))
        ring.lost_events = 7
        ring.push(event(40001, SYN))
        await wait_for(lambda: any(isinstance(e, LostEvent) for e in telemetry.recorder.ring.snapshot().entries))
        lost = [e for e in telemetry.recorder.ring.snapshot().entries if isinstance(e, LostEvent)]
        assert [e.count for e in lost] == [7]
        assert telemetry.metrics.series("hubble_lost_events")[("PERF_EVENT_RING_BUFFER",)] == 7
        await wait_for(lambda: len(kernel_flows(telemetry)) == 2)
    finally:
        await telemetry.close()
        ring.close()
