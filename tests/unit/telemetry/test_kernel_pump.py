"""Telemetry.watch_kernel: the eBPF events reach the recorder in batches, and none is lost on the way."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from agent.mesh.store import MeshStore
from agent.telemetry.hub import Telemetry, TelemetryConfig
from agent.telemetry.kernel import KernelEvent
from agent.telemetry.model import EventType, Flow, LostEvent

SYN, FIN = 0x02, 0x01


class FakeRing:
    """A KernelEventSource fed by the test: events wait until polled, as in the kernel's ring buffer."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[KernelEvent], None]] = []
        self._waiting: list[KernelEvent] = []
        self._cond = threading.Condition()
        self.lost_events = 0
        self.nonempty_polls = 0

    def subscribe(self, callback: Callable[[KernelEvent], None]) -> None:
        self._callbacks.append(callback)

    def push(self, ev: KernelEvent) -> None:
        with self._cond:
            self._waiting.append(ev)
            self._cond.notify()

    def poll_events(self, timeout_ms: int) -> int:
        with self._cond:
            if not self._waiting:
                self._cond.wait(timeout_ms / 1000)
            batch, self._waiting = self._waiting, []
        for ev in batch:
            for cb in self._callbacks:
                cb(ev)
        self.nonempty_polls += bool(batch)
        return len(batch)


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
        # 200 events over >= 100 ms: read in a handful of batches, not one wake-up (and GIL hand-off) per event
        assert ring.nonempty_polls <= 10
    finally:
        await telemetry.close()


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
