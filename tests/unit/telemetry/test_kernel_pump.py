"""The kernel's events read on the event loop (KernelReader, through the node glue's KernelEvents): each becomes a
flow and counts in the metrics, with a bounded number of wake-ups, none while idle, and no thread; losses are
shown in place; a malformed record is left out, named and counted while the others are kept; and a flow read
back is exactly what the eager path of before (decode, describe, build at once) made of the same record."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from agent.capture import maps
from agent.capture.maps import EventType as KEvent
from agent.capture.maps import FlowEvent, Hook, Reason
from agent.capture.maps import Verdict as KVerdict
from agent.mesh.store import MeshStore
from agent.node.kernel_events import KernelEvents
from agent.telemetry import recorder as recorder_module
from agent.telemetry.hub import Telemetry, TelemetryConfig
from agent.telemetry.kernel_reader import KERNEL_BATCH, KERNEL_CHUNK, KernelReader
from agent.telemetry.metrics import Metrics
from agent.telemetry.model import (
    Direction,
    Endpoint,
    EventType,
    Flow,
    LostEvent,
    LostSource,
    Reporter,
    Verdict,
    flag_names,
)
from agent.telemetry.recorder import FlowRecorder
from tests.fixtures.kernel_ring import ACK, FIN, RST, SYN, FakeEventRing, record
from tests.fixtures.mesh_objects import AMBIENT, namespace, pod

CLIENT, CLIENT6, SERVER, SERVER6 = "10.1.0.7", "fd00:1::7", "10.2.0.9", "fd00:2::9"
OUTSIDE, OUTSIDE6 = "192.0.2.1", "2001:db8::1"


def event(port: int, flags: int = SYN, **kw: object) -> bytes:
    return record(CLIENT, port, SERVER, 80, ts_ns=time.monotonic_ns(), tcp_flags=flags,
                  type=KEvent.FIN if flags & FIN else KEvent.SYN, **kw)  # type: ignore[arg-type]


def kernel_flows(rec: FlowRecorder) -> list[Flow]:
    return [e for e in rec.ring.snapshot().entries if isinstance(e, Flow) and e.event_type == EventType.KERNEL]


async def wait_for(what: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
def ring() -> Iterator[FakeEventRing]:
    r = FakeEventRing()
    yield r
    r.close()


@pytest.fixture
async def telemetry(ring: FakeEventRing) -> AsyncIterator[Telemetry]:
    t = Telemetry("node-1", MeshStore(), "cluster.local", TelemetryConfig(flows=1000))
    t.watch_kernel(KernelEvents(ring))
    yield t
    await t.close()


def reader_of(t: Telemetry) -> KernelReader:
    assert t._kernel is not None
    return t._kernel


async def test_events_arriving_one_by_one_are_read_on_the_loop_in_batches_and_become_flows_and_metrics(
        ring: FakeEventRing, telemetry: Telemetry) -> None:
    threads = set(threading.enumerate())
    connections = 100
    start = time.monotonic()
    for port in range(40000, 40000 + connections):  # a SYN and a FIN per connection, ~1 ms apart
        ring.push(event(port, SYN), event(port, FIN | ACK))
        await asyncio.sleep(0.001)
    await wait_for(lambda: len(kernel_flows(telemetry.recorder)) == 2 * connections)
    elapsed = time.monotonic() - start
    flows = kernel_flows(telemetry.recorder)
    assert sorted(f.source.port for f in flows) == sorted(2 * list(range(40000, 40100)))
    flags = telemetry.metrics.series("hubble_tcp_flags")
    assert flags == {("SYN", "IPv4"): connections, ("FIN", "IPv4"): connections}
    assert telemetry.metrics.series("hubble_flows_processed") == {("Trace", "kernel", "FORWARDED"): 2 * connections}
    # read by the event loop's thread, and no thread was started for it
    assert ring.threads == {threading.get_ident()}
    assert set(threading.enumerate()) <= threads
    # 200 events over >= 100 ms: batches (one per KERNEL_BATCH at most, each read in chunks, the last of which finds
    # the ring empty or not full), not a wake-up per event
    batches = elapsed / KERNEL_BATCH + 1
    chunks = batches + 2 * connections / KERNEL_CHUNK
    assert ring.reads <= 2 * chunks, (ring.reads, elapsed)
    assert reader_of(telemetry).wakeups <= 4 * chunks, (reader_of(telemetry).wakeups, elapsed)


async def test_no_wakeup_at_all_while_no_event_arrives(ring: FakeEventRing, telemetry: Telemetry) -> None:
    reader = reader_of(telemetry)
    await asyncio.sleep(0.5)
    assert (reader.wakeups, ring.reads, ring.lost_reads) == (0, 0, 1)  # (the count when the reading began)
    ring.push(event(40000))
    await wait_for(lambda: len(kernel_flows(telemetry.recorder)) == 1)
    await asyncio.sleep(0.3)  # the loss count is read once after the batch, at most 200 ms after the last reading
    after = (reader.wakeups, ring.reads, ring.lost_reads)
    assert after[2] == 2, after
    await asyncio.sleep(0.5)
    assert (reader.wakeups, ring.reads, ring.lost_reads) == after


async def test_a_burst_is_read_in_chunks_with_the_loop_serving_others_between_them(ring: FakeEventRing) -> None:
    ticks = 0
    seen: list[int] = []  # the loop's ticks at each read
    read = ring.read_events

    def counted(limit: int) -> list[bytes]:
        seen.append(ticks)
        return read(limit)

    ring.read_events = counted  # type: ignore[method-assign]

    async def other_work() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    recorder = FlowRecorder("node-1", 4096, Metrics())
    reader = KernelReader(KernelEvents(ring), recorder, batch=0.05, chunk=256)
    worker = asyncio.create_task(other_work())
    try:
        ring.push(*(event(port) for port in range(30000, 31000)))
        await wait_for(lambda: ring.waiting == 0 and len(kernel_flows(recorder)) == 1000)
        assert len(seen) == 4  # 256 + 256 + 256 + 232
        assert all(b > a for a, b in itertools.pairwise(seen)), seen  # other work ran between two chunks
        assert [f.source.port for f in kernel_flows(recorder)] == list(range(30000, 31000))
    finally:
        worker.cancel()
        reader.close()


async def test_events_the_kernel_could_not_queue_are_counted_in_place(ring: FakeEventRing,
                                                                     telemetry: Telemetry) -> None:
    ring.push(event(40000))
    await wait_for(lambda: len(kernel_flows(telemetry.recorder)) == 1)
    ring.lost = 7
    ring.push(event(40001))
    await wait_for(lambda: any(isinstance(e, LostEvent) for e in telemetry.recorder.ring.snapshot().entries))
    entries = telemetry.recorder.ring.snapshot().entries
    assert isinstance(entries[0], Flow) and entries[0].source.port == 40000
    lost = [e for e in entries if isinstance(e, LostEvent)]
    assert [(e.source, e.count) for e in lost] == [(LostSource.PERF_EVENT_RING_BUFFER, 7)]
    assert telemetry.metrics.series("hubble_lost_events") == {("PERF_EVENT_RING_BUFFER",): 7}
    assert telemetry.recorder.ring.lost == 7
    await wait_for(lambda: len(kernel_flows(telemetry.recorder)) == 2)


async def test_the_loss_count_is_read_at_most_every_200_ms_while_events_stream(ring: FakeEventRing,
                                                                              telemetry: Telemetry) -> None:
    start = time.monotonic()
    for port in range(30000, 30600):  # ~0.6 s of events
        ring.push(event(port))
        await asyncio.sleep(0.001)
    await wait_for(lambda: len(kernel_flows(telemetry.recorder)) == 600)
    elapsed = time.monotonic() - start
    assert ring.lost_reads <= 2 + elapsed / 0.2, (ring.lost_reads, elapsed)


async def test_a_malformed_record_is_left_out_named_and_counted_and_the_others_are_kept(
        ring: FakeEventRing, telemetry: Telemetry, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recorder_module, "REJECTED_LOG_EVERY", 0.0)
    bad_verdict = bytearray(event(40001))
    bad_verdict[maps.EventC.verdict.offset] = 0
    truncated = event(40002)[:50]
    with caplog.at_level(logging.WARNING, logger="agent.telemetry.recorder"):
        ring.push(event(40000), bytes(bad_verdict), truncated, event(40003))
        await wait_for(lambda: len(kernel_flows(telemetry.recorder)) == 2)
        ring.push(event(40004))  # and the reading goes on
        await wait_for(lambda: len(kernel_flows(telemetry.recorder)) == 3)
    assert [f.source.port for f in kernel_flows(telemetry.recorder)] == [40000, 40003, 40004]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("ambit_event.verdict: unknown value 0" in w for w in warnings), warnings
    assert any("a record of 50 bytes, expected 56" in w for w in warnings), warnings
    assert telemetry.recorder.kernel_rejected == 2
    assert telemetry.metrics.series("ambit_kernel_events_rejected") == {(): 2}
    assert telemetry.metrics.series("hubble_flows_processed") == {("Trace", "kernel", "FORWARDED"): 3}


async def test_a_failed_read_is_logged_and_the_reading_goes_on(ring: FakeEventRing,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    read, failures = ring.read_events, [OSError(5, "Input/output error")]

    def failing_once(limit: int) -> list[bytes]:
        if failures:
            raise failures.pop()
        return read(limit)

    ring.read_events = failing_once  # type: ignore[method-assign]
    recorder = FlowRecorder("node-1", 64, Metrics())
    reader = KernelReader(KernelEvents(ring), recorder, batch=0.02)
    try:
        with caplog.at_level(logging.ERROR, logger="agent.telemetry.kernel_reader"):
            ring.push(event(40000))
            await wait_for(lambda: len(kernel_flows(recorder)) == 1)
        assert "reading the kernel's events failed" in caplog.text and "Input/output error" in caplog.text
    finally:
        reader.close()


async def test_a_follower_gets_kernel_flows_as_they_are_read(ring: FakeEventRing, telemetry: Telemetry) -> None:
    snapshot, follower = telemetry.recorder.ring.follow(lambda f: f.source.port % 2 == 0)
    try:
        assert snapshot.entries == []
        ring.push(*(event(port) for port in range(40000, 40004)))
        got = await asyncio.wait_for(follower.get(), 5)
        assert [e.source.port for e in got if isinstance(e, Flow)] == [40000, 40002]
    finally:
        follower.close()


# -- a flow read back is the flow of before -----------------------------------------------------------------------

class Clock:
    wall, mono = 1_700_000_000_000_000_000, 5_000_000_000


def eager_flow(rec: FlowRecorder, raw: bytes, sequence: int, resolve: Callable[[str], Endpoint | None]) -> Flow:
    """What the eager path made of a record, as before this reader (de6cebb: node.kernel_events.kernel_event, then
    FlowRecorder.kernel_event, _endpoint and _kernel_summary, each event built when it was read from the ring)."""
    ev = FlowEvent.from_bytes(raw)
    toward_pod, dropped = ev.hook in (Hook.UPLINK, Hook.DOOR), ev.verdict == KVerdict.DROPPED
    action, reason = ev.action, ev.reason_text
    if dropped:
        summary = f"dropped in the kernel: {reason or action}"
    else:
        summary = f"TCP Flags: {', '.join(flag_names(ev.tcp_flags)) or 'none'}; {action}" + (
            f" ({reason})" if reason else "")

    def endpoint(ip: str, port: int) -> Endpoint:
        known = resolve(ip)
        if known is None:
            return Endpoint(ip, port)
        return Endpoint(ip, port, known.identity, known.namespace, known.pod_name, known.labels, known.workload,
                        known.service)

    return Flow(Clock.wall - Clock.mono + ev.ts_ns, f"{rec._uuid_prefix}-{sequence:012x}",
                Verdict.DROPPED if dropped else Verdict.FORWARDED, EventType.KERNEL,
                Direction.INGRESS if toward_pod else Direction.EGRESS,
                Reporter.DESTINATION if toward_pod else Reporter.SOURCE, rec.node,
                endpoint(ev.src, ev.sport), endpoint(ev.dst, ev.dport), False,
                tcp_flags=ev.tcp_flags, drop_reason_desc=reason if dropped else "", summary=summary)


def eager_metrics(raws: list[bytes]) -> Metrics:
    """The metrics the eager path counted for these records (one update per event)."""
    metrics = Metrics()
    for raw in raws:
        ev = FlowEvent.from_bytes(raw)
        dropped = ev.verdict == KVerdict.DROPPED
        metrics.flow_processed("Drop" if dropped else "Trace", "kernel", "DROPPED" if dropped else "FORWARDED")
        if dropped:
            metrics.dropped(ev.reason.name if ev.reason != Reason.NONE else "UNKNOWN", "TCP")
        counted = ([("SYN-ACK" if ev.tcp_flags & ACK else "SYN")] if ev.tcp_flags & SYN else []) + (
            ["FIN"] if ev.tcp_flags & FIN else []) + (["RST"] if ev.tcp_flags & RST else [])
        metrics.tcp_flags(counted, "IPv6" if ":" in ev.src else "IPv4")
    return metrics


KINDS: dict[str, dict[str, object]] = {
    "SYN": dict(type=KEvent.SYN, tcp_flags=SYN),
    "SYN-ACK steered": dict(type=KEvent.SYN, tcp_flags=SYN | ACK, verdict=KVerdict.STEERED),
    "SYN passed fail-open": dict(type=KEvent.SYN, tcp_flags=SYN, verdict=KVerdict.PASSED, reason=Reason.FAIL_OPEN,
                                 hook=Hook.UPLINK),
    "FIN": dict(type=KEvent.FIN, tcp_flags=FIN | ACK),
    "RST": dict(type=KEvent.RST, tcp_flags=RST | ACK),
    "RST on the door": dict(type=KEvent.RST, tcp_flags=RST, hook=Hook.DOOR, listener_port=15006),
    "drop, no listener": dict(type=KEvent.DROP, tcp_flags=SYN, verdict=KVerdict.DROPPED, reason=Reason.NO_LISTENER,
                              hook=Hook.UPLINK, listener_port=0),
    "drop, spoofed": dict(type=KEvent.DROP, tcp_flags=SYN, verdict=KVerdict.DROPPED, reason=Reason.SPOOFED),
    "drop, no reason": dict(type=KEvent.DROP, tcp_flags=0, verdict=KVerdict.DROPPED),
}
ENDS = {  # (source, destination) per family and what the store knows of them
    ("IPv4", "both enrolled"): (CLIENT, SERVER), ("IPv6", "both enrolled"): (CLIENT6, SERVER6),
    ("IPv4", "source unknown"): (OUTSIDE, SERVER), ("IPv6", "source unknown"): (OUTSIDE6, SERVER6),
    ("IPv4", "neither known"): (OUTSIDE, "198.51.100.7"), ("IPv6", "neither known"): (OUTSIDE6, "2001:db8::7"),
}


def mesh() -> Telemetry:
    store = MeshStore()
    assert store.apply([namespace("shop", AMBIENT), namespace("data", AMBIENT),
                        pod("client-1", "shop", CLIENT, labels={"app": "client"}, ips=[CLIENT6]),
                        pod("db-0", "data", SERVER, labels={"app": "db", "version": "v2"}, ips=[SERVER6])]) == []
    return Telemetry("node-1", store, "cluster.local", TelemetryConfig())


@pytest.mark.parametrize("ends", list(ENDS), ids=[f"{f}-{k}" for f, k in ENDS])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_flow_read_back_is_what_the_eager_path_made(ring: FakeEventRing, kind: str, ends: tuple[str, str]) -> None:
    telemetry = mesh()

    def resolve(ip: str) -> Endpoint:
        return telemetry.endpoint((ip, 0))

    metrics = Metrics()
    rec = FlowRecorder("node-1", 64, metrics, resolve=resolve, clock=lambda: Clock.wall, monotonic=lambda: Clock.mono)
    src, dst = ENDS[ends]
    raws = [record(src, 41000 + i, dst, 5432, ts_ns=Clock.mono - 1_000_000 * (3 - i), **KINDS[kind])  # type: ignore[arg-type]
            for i in range(3)]
    assert rec.kernel_records(KernelEvents(ring), raws) == 3
    got = kernel_flows(rec)
    want = [eager_flow(rec, raw, i + 1, resolve) for i, raw in enumerate(raws)]
    assert got == want
    assert [f.to_proto() for f in got] == [f.to_proto() for f in want]
    if "enrolled" in ends[1]:
        assert got[0].source.pod_name == "client-1" and got[0].destination.identity == \
            "spiffe://cluster.local/ns/data/sa/sa"
    old = eager_metrics(raws)
    for family in ("hubble_flows_processed", "hubble_drop", "hubble_tcp_flags"):
        assert metrics.series(family) == old.series(family), family


def test_the_ends_are_what_the_store_knew_when_the_events_were_read(ring: FakeEventRing) -> None:
    """Enrichment happens when the records are read from the kernel's ring (as it did before), not when the flows
    are read: a pod that appears later does not rename the events of before; its next events carry its name."""
    store = MeshStore()
    telemetry = Telemetry("node-1", store, "cluster.local", TelemetryConfig())
    source = KernelEvents(ring)
    telemetry.recorder.kernel_records(source, [record(CLIENT, 41000, SERVER, 80)])
    assert store.apply([namespace("shop", AMBIENT), pod("client-1", "shop", CLIENT)]) == []
    telemetry.recorder.kernel_records(source, [record(CLIENT, 41001, SERVER, 80)])
    assert store.apply([], deletes=[("Pod", "shop", "client-1")]) == []
    before, during = kernel_flows(telemetry.recorder)
    assert (before.source.pod_name, during.source.pod_name) == ("", "client-1")
    assert during.source.identity == "spiffe://cluster.local/ns/shop/sa/sa"
