"""FlowRecorder: what each agent-facing call puts in the ring and in the metrics; the model's protobuf form."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Iterator

import pytest

from agent.capture.maps import EventType as KEvent
from agent.capture.maps import Hook, Reason
from agent.capture.maps import Verdict as KVerdict
from agent.node.kernel_events import KernelEvents
from agent.telemetry import observer_pb2 as pb
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
from agent.telemetry.recorder import (
    JOURNAL_MAX,
    JOURNAL_TURN,
    JOURNAL_WAIT,
    FlowRecorder,
    drop_code,
    response_flags_for,
)
from tests.fixtures.kernel_ring import FakeEventRing, record

SRC = Endpoint("10.1.0.7", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-1", {"app": "client"})
DST = Endpoint("10.2.0.9", 5432, "spiffe://cluster.local/ns/data/sa/db", "data", "db-0", {"app": "db"})


class Clock:
    def __init__(self) -> None:
        self.wall = 1_700_000_000_000_000_000
        self.mono = 5_000_000_000

    def advance(self, ns: int) -> None:
        self.wall += ns
        self.mono += ns


@pytest.fixture
def clock() -> Clock:
    return Clock()


def recorder(clock: Clock, metrics: Metrics | None = None, **kw: object) -> FlowRecorder:
    return FlowRecorder("node-1", capacity=16, metrics=metrics, clock=lambda: clock.wall,
                        monotonic=lambda: clock.mono, **kw)  # type: ignore[arg-type]


def flows(rec: FlowRecorder) -> list[Flow]:
    return [e for e in rec.ring.snapshot().entries if isinstance(e, Flow)]


@pytest.mark.parametrize(("ours", "theirs"), [(Verdict, pb.Verdict), (Direction, pb.TrafficDirection),
                                              (EventType, pb.EventType), (Reporter, pb.Reporter),
                                              (LostSource, pb.LostEventSource)])
def test_enums_mirror_the_proto(ours: type[enum.IntEnum], theirs: object) -> None:
    assert {m.name: m.value for m in ours} == dict(theirs.items())  # type: ignore[attr-defined]


def test_start_and_end(clock: Clock) -> None:
    rec = recorder(clock)
    handle = rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True)
    clock.advance(1_500_000_000)
    handle.end(120, 4096, "closed by client")
    handle.end(1, 1, "again")  # ignored
    start, end = flows(rec)
    assert (start.verdict, start.event_type, start.direction, start.reporter) == \
        (Verdict.FORWARDED, EventType.START, Direction.EGRESS, Reporter.SOURCE)
    assert start.encrypted and start.node_name == "node-1" and handle.uuid == start.uuid
    assert (end.verdict, end.event_type, end.bytes_sent, end.bytes_received, end.duration_ns, end.close_reason) == \
        (Verdict.FORWARDED, EventType.END, 120, 4096, 1_500_000_000, "closed by client")
    assert end.summary == "closed by client; sent 120 B, received 4096 B in 1.500s"
    assert start.uuid != end.uuid


def test_a_connections_flows_are_made_when_read_and_then_kept(clock: Clock) -> None:
    rec = recorder(clock)
    handle = rec.start(direction="INGRESS", reporter="destination", source=SRC, destination=DST, mtls=False)
    clock.advance(2_000)
    first = flows(rec)
    assert [(f.event_type, f.time_ns, f.summary) for f in first] == [
        (EventType.START, 1_700_000_000_000_000_000, "opened, plaintext")]
    clock.advance(1_000_000)
    handle.end(5, 6, "closed")
    start, end = flows(rec)
    assert start is first[0]  # built once
    assert (end.event_type, end.time_ns, end.duration_ns, end.direction, end.reporter) == \
        (EventType.END, 1_700_000_000_001_002_000, 1_002_000, Direction.INGRESS, Reporter.DESTINATION)
    assert end.summary == "closed; sent 5 B, received 6 B in 0.001s" and not end.encrypted


async def test_a_follower_sees_a_connections_flows_as_they_happen(clock: Clock) -> None:
    rec = recorder(clock)
    _snap, follower = rec.ring.follow(lambda f: True)
    handle = rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True)
    (start,) = await asyncio.wait_for(follower.get(), 2)
    assert isinstance(start, Flow) and start.event_type == EventType.START and start.uuid == handle.uuid
    handle.end(1, 2, "closed")
    (end,) = await asyncio.wait_for(follower.get(), 2)
    assert isinstance(end, Flow) and (end.event_type, end.bytes_sent, end.bytes_received) == (EventType.END, 1, 2)
    follower.close()


async def test_on_a_loop_connections_wait_in_a_journal_and_every_reader_sees_them(clock: Clock) -> None:
    metrics = Metrics()
    rec = recorder(clock, metrics)
    first = rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True)
    assert rec.ring.num_flows == 0  # waiting: nothing counted nor written yet
    assert metrics.series("istio_tcp_connections_opened") != {}  # a reader of the metrics has them counted first
    assert rec.ring.num_flows == 1
    first.end(1, 2, "closed")
    rec.drop(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True, reason="denied: x")
    assert [f.event_type for f in flows(rec)] == [EventType.START, EventType.END, EventType.DROP]  # in order
    assert metrics.series("hubble_flows_processed") == {("Trace", "start", "FORWARDED"): 1,
                                                        ("Trace", "end", "FORWARDED"): 1,
                                                        ("Drop", "drop", "DROPPED"): 1}


async def test_the_journal_is_written_when_due_or_full(clock: Clock) -> None:
    rec = FlowRecorder("node-1", capacity=2 * JOURNAL_MAX, clock=lambda: clock.wall, monotonic=lambda: clock.mono)
    for _ in range(JOURNAL_MAX - 1):
        rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True).end(1, 1, "closed")
    assert rec.ring.num_flows == 0
    rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True)  # full: written at once
    assert rec.ring.num_flows == 2 * JOURNAL_MAX - 1
    rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True)
    await asyncio.sleep(JOURNAL_WAIT * 4)  # due: written with nobody reading
    assert rec.ring.num_flows == 2 * JOURNAL_MAX


async def test_a_flush_of_at_most_so_many_leaves_the_rest_to_the_next_loop_turn(clock: Clock) -> None:
    rec = FlowRecorder("node-1", capacity=2 * JOURNAL_MAX, clock=lambda: clock.wall, monotonic=lambda: clock.mono)
    for _ in range(JOURNAL_TURN + 5):
        rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True)
    rec.flush(JOURNAL_TURN)  # as the timer does
    assert rec.ring.num_flows == JOURNAL_TURN
    await asyncio.sleep(0)  # one turn
    assert rec.ring.num_flows == JOURNAL_TURN + 5


def test_a_batch_counts_every_connection_once_per_series(clock: Clock) -> None:
    """A journal's batch is counted by series: every connection and byte in it, failed ones under their flags, and
    nothing for a pod forgotten between a connection's start and its end."""
    metrics = Metrics()
    rec = FlowRecorder("node-1", capacity=4 * JOURNAL_MAX, metrics=metrics, clock=lambda: clock.wall,
                       monotonic=lambda: clock.mono)
    for i in range(5):
        rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True).end(
            10 + i, 100, "closed")
    for _ in range(2):
        rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True).end(
            1, 0, "connect refused", error=True)
    outlived = rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=True)
    rec.flush()
    series = {f: metrics.series(f) for f in ("istio_tcp_connections_opened", "istio_tcp_connections_closed",
                                              "istio_tcp_connections_failed", "istio_tcp_received_bytes",
                                              "istio_tcp_sent_bytes")}
    assert list(series["istio_tcp_connections_opened"].values()) == [8]
    assert sorted(series["istio_tcp_connections_closed"].values()) == [2, 5]  # by response flags: "-" and CONNECT
    assert list(series["istio_tcp_connections_failed"].values()) == [2]
    assert list(series["istio_tcp_received_bytes"].values()) == [sum(10 + i for i in range(5)) + 2]  # request bytes
    assert list(series["istio_tcp_sent_bytes"].values()) == [500]
    assert metrics.forget_workload("data", "db-0") > 0
    outlived.end(7, 7, "closed")
    rec.flush()
    assert metrics.series("istio_tcp_connections_closed") == {}  # the pod was forgotten meanwhile: kept gone


def test_connections_of_several_shapes_in_one_batch_keep_their_own_series(clock: Clock) -> None:
    """A batch looks a series up once per shape (reporter, mTLS, the two ends): different ends, or the same pod
    relabelled (another end object), are other series."""
    metrics = Metrics()
    rec = FlowRecorder("node-1", capacity=4 * JOURNAL_MAX, metrics=metrics, clock=lambda: clock.wall,
                       monotonic=lambda: clock.mono)
    relabelled = DST.at(DST.port)
    relabelled.labels = {"app": "db", "version": "v9"}
    for destination, n in ((DST, 3), (relabelled, 2), (DST, 1)):
        for _ in range(n):
            rec.start(direction="EGRESS", reporter="source", source=SRC, destination=destination, mtls=True)
    rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=False)
    rec.flush()
    opened = metrics.series("istio_tcp_connections_opened")
    assert sorted(opened.values()) == [1, 2, 4]
    assert sorted((labels[14], labels[-1]) for labels in opened) == [  # destination revision, security policy
        ("latest", "mutual_tls"), ("latest", "unknown"), ("v9", "mutual_tls")]


def test_end_with_error(clock: Clock) -> None:
    rec = recorder(clock)
    rec.start(direction="EGRESS", reporter="source", source=SRC, destination=DST, mtls=False).end(
        0, 0, "connect refused by 10.2.0.9:5432", error=True)
    end = flows(rec)[-1]
    assert end.verdict == Verdict.ERROR and end.drop_reason_desc == "connect refused by 10.2.0.9:5432"
    assert flag_names(end.tcp_flags) == ["RST"]


def test_drop_names_policy(clock: Clock) -> None:
    rec = recorder(clock)
    rec.drop(direction="INGRESS", reporter="destination", source=SRC, destination=DST, mtls=True,
             reason="denied by AuthorizationPolicy data/deny-shop rule 0", policy="data/deny-shop")
    (drop,) = flows(rec)
    assert (drop.verdict, drop.event_type, drop.policy) == (Verdict.DROPPED, EventType.DROP, "data/deny-shop")
    assert drop.drop_reason_desc == "denied by AuthorizationPolicy data/deny-shop rule 0"
    proto = drop.to_proto()
    assert proto.verdict == pb.DROPPED and proto.policy == "data/deny-shop" and proto.ip.encrypted


def test_bad_direction_is_refused(clock: Clock) -> None:
    with pytest.raises(ValueError, match="direction"):
        recorder(clock).start(direction="UP", reporter="source", source=SRC, destination=DST,  # type: ignore[arg-type]
                              mtls=True)


@pytest.fixture
def source() -> Iterator[KernelEvents]:
    ring = FakeEventRing()
    yield KernelEvents(ring)
    ring.close()


def test_kernel_events(clock: Clock, source: KernelEvents) -> None:
    metrics = Metrics()
    rec = recorder(clock, metrics, resolve=lambda ip: SRC if ip == SRC.ip else None)
    rec.kernel_records(source, [
        record(),
        record(type=KEvent.DROP, verdict=KVerdict.DROPPED, reason=Reason.NO_LISTENER, hook=Hook.UPLINK,
               listener_port=0),
        record(type=KEvent.SYN, tcp_flags=0x12, verdict=KVerdict.STEERED)])
    syn, drop, synack = flows(rec)
    # the kernel's monotonic timestamp becomes wall time (1 s before "now")
    assert syn.time_ns == clock.wall - 1_000_000_000
    assert syn.event_type == EventType.KERNEL and syn.verdict == Verdict.FORWARDED
    assert syn.source.pod_name == "client-1" and syn.source.port == 41000 and not syn.destination.pod_name
    assert syn.summary == "TCP Flags: SYN; redirected to the proxy on :15001"
    assert (drop.verdict, drop.direction, drop.reporter) == (Verdict.DROPPED, Direction.INGRESS, Reporter.DESTINATION)
    assert "fail-closed" in drop.drop_reason_desc
    assert synack.summary.startswith("TCP Flags: SYN, ACK; steered")
    assert metrics.series("hubble_tcp_flags") == {("SYN", "IPv4"): 2, ("SYN-ACK", "IPv4"): 1}
    assert metrics.series("hubble_drop") == {("NO_LISTENER", "TCP"): 1}
    assert metrics.series("hubble_flows_processed") == {("Trace", "kernel", "FORWARDED"): 2,
                                                        ("Drop", "kernel", "DROPPED"): 1}


def test_kernel_events_of_one_kind_share_their_words_and_keep_their_own_addresses(
        clock: Clock, source: KernelEvents) -> None:
    """What an event says (action, reason, summary) is worked out once per kind; every event keeps its own
    addresses, ports and flags, and a kind seen later is described for itself."""
    metrics = Metrics()
    rec = recorder(clock, metrics)
    for port in (41000, 41001):
        rec.kernel_records(source, [record(sport=port), record(sport=port, type=KEvent.FIN, tcp_flags=0x11)])
    rec.kernel_records(source, [record(sport=41002, src="fd00::7", listener_port=15006),
                                record(sport=41003, type=KEvent.DROP, verdict=KVerdict.DROPPED, reason=Reason.SPOOFED)])
    syn0, fin0, syn1, fin1, syn6, spoofed = flows(rec)
    assert [f.source.port for f in (syn0, fin0, syn1, fin1)] == [41000, 41000, 41001, 41001]
    assert syn0.summary == syn1.summary == "TCP Flags: SYN; redirected to the proxy on :15001"
    assert fin0.summary == fin1.summary == "TCP Flags: FIN, ACK; redirected to the proxy on :15001"
    assert (syn6.source.ip, syn6.summary) == ("fd00::7", "TCP Flags: SYN; redirected to the proxy on :15006")
    assert spoofed.verdict == Verdict.DROPPED and "spoofed" in spoofed.summary and "spoofed" in spoofed.drop_reason_desc
    assert metrics.series("hubble_tcp_flags") == {("SYN", "IPv4"): 3, ("FIN", "IPv4"): 2, ("SYN", "IPv6"): 1}
    assert metrics.series("hubble_drop") == {("SPOOFED", "TCP"): 1}


def test_lost_kernel_events(clock: Clock) -> None:
    metrics = Metrics()
    rec = recorder(clock, metrics)
    rec.lost_kernel_events(0)
    rec.lost_kernel_events(12)
    (lost,) = rec.ring.snapshot().entries
    assert isinstance(lost, LostEvent) and (lost.source, lost.count) == (LostSource.PERF_EVENT_RING_BUFFER, 12)
    assert rec.ring.lost == 12
    assert metrics.series("hubble_lost_events") == {("PERF_EVENT_RING_BUFFER",): 12}


@pytest.mark.parametrize(("reason", "policy", "code"), [
    ("denied by AuthorizationPolicy a/b rule 1", "a/b", "POLICY_DENIED"),
    ("STRICT mTLS: plaintext from 10.0.0.5", None, "STRICT_MTLS"),
    ("unknown destination", None, "UNKNOWN_DESTINATION"),
    (":::", None, "UNKNOWN"),
])
def test_drop_code(reason: str, policy: str | None, code: str) -> None:
    assert drop_code(reason, policy) == code


def test_response_flags() -> None:
    assert response_flags_for("TLS handshake failed: bad certificate") == "TLS_FAILURE"
    assert response_flags_for("peer identity mismatch") == "TLS_FAILURE"
    assert response_flags_for("connection refused") == "CONNECT"


def test_proto_form(clock: Clock) -> None:
    rec = recorder(clock)
    rec.start(direction="INGRESS", reporter="destination", source=Endpoint("fd00::1", 5000), destination=DST,
              mtls=False).end(1, 2, "eof")
    start, end = (f.to_proto() for f in flows(rec))
    assert start.ip.ipVersion == pb.IPv6 and start.l4.tcp.flags.SYN and not start.HasField("duration")
    assert start.source.workload == "" and start.destination.workload == "db-0"
    assert list(start.destination.labels) == ["app=db"]
    assert end.bytes_sent == 1 and end.bytes_received == 2 and end.l4.tcp.flags.FIN
    assert end.Type == pb.L3_L4 and end.traffic_direction == pb.INGRESS and end.reporter == pb.DESTINATION


def test_flow_ids_are_unique_uuid4s(clock: Clock) -> None:
    import uuid

    rec, other = recorder(clock), recorder(clock)
    ids = [rec._uuid() for _ in range(1000)] + [other._uuid() for _ in range(1000)]
    assert len(set(ids)) == 2000
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)
