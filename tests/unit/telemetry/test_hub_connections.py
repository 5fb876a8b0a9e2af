"""Telemetry.opened / dropped with what the store knows of each end: N connections give N start and N end flows
and the matching Istio counts, and a change in the store shows in the next connection's flows and metrics."""

from __future__ import annotations

from agent.mesh.store import MeshStore
from agent.telemetry.hub import Telemetry, TelemetryConfig
from agent.telemetry.model import EventType, Flow, Verdict
from tests.fixtures.mesh_objects import namespace, pod

CLIENT, SERVER = "10.0.0.1", "10.0.1.1"


def telemetry_with_pods(server_labels: dict[str, str]) -> tuple[Telemetry, MeshStore]:
    store = MeshStore()
    assert store.apply([namespace("shop"), pod("client-1", "shop", CLIENT, labels={"app": "client"}),
                        pod("db-0", "data", SERVER, labels=server_labels), namespace("data")]) == []
    return Telemetry("node-a", store, "cluster.local", TelemetryConfig(flows=10_000)), store


def flows(t: Telemetry) -> list[Flow]:
    return [e for e in t.recorder.ring.snapshot().entries if isinstance(e, Flow)]


def connect(t: Telemetry, port: int, sent: int = 100, received: int = 200) -> None:
    handle = t.opened(inbound=False, client=(CLIENT, port), target=(SERVER, 5432), mtls=True)
    assert handle is not None
    handle.end(sent, received, "closed")


def test_n_connections_give_n_start_and_end_flows_and_the_istio_counts() -> None:
    t, _ = telemetry_with_pods({"app": "db", "version": "v1"})
    n = 250
    for port in range(40000, 40000 + n):
        connect(t, port)
    got = flows(t)
    assert [f.event_type for f in got] == [EventType.START, EventType.END] * n
    assert sorted(f.source.port for f in got if f.event_type == EventType.END) == list(range(40000, 40000 + n))
    end = got[-1]
    assert (end.source.pod_name, end.source.identity) == ("client-1", "spiffe://cluster.local/ns/shop/sa/sa")
    assert (end.destination.pod_name, end.destination.workload, end.destination.port) == ("db-0", "db", 5432)
    assert (end.bytes_sent, end.bytes_received, end.verdict) == (100, 200, Verdict.FORWARDED)
    for family, value in (("istio_tcp_connections_opened", n), ("istio_tcp_connections_closed", n),
                          ("istio_tcp_received_bytes", 100 * n), ("istio_tcp_sent_bytes", 200 * n)):
        [(labels, count)] = t.metrics.series(family).items()
        assert count == value, family
        assert labels[12:16] == ("db", "db", "v1", "data")  # destination workload, canonical name, revision, ns
    assert t.metrics.series("hubble_flows_processed")[("Trace", "end", "FORWARDED")] == n


def test_a_changed_pod_shows_in_the_next_connections_flows_and_series() -> None:
    t, store = telemetry_with_pods({"app": "db", "version": "v1"})
    connect(t, 40000)
    assert store.apply([pod("db-0", "data", SERVER, labels={"app": "db", "version": "v2"})]) == []
    connect(t, 40001)
    assert [f.destination.labels.get("version") for f in flows(t)] == ["v1", "v1", "v2", "v2"]
    revisions = sorted(labels[14] for labels in t.metrics.series("istio_tcp_connections_opened"))
    assert revisions == ["v1", "v2"]
    assert store.apply([], deletes=[("Pod", "data", "db-0")]) == []
    connect(t, 40002)
    assert flows(t)[-1].destination.pod_name == ""  # gone from the store: an address only


def test_a_service_addressed_connection_carries_the_service_and_both_ports() -> None:
    """The ends are kept per mesh state without ports (and the destination per Service called): each connection's
    flows still carry its own ports, and the Service only where the client named it."""
    t, _ = telemetry_with_pods({"app": "db"})
    for port, service in ((40000, "db.data.svc.cluster.local"), (40001, None), (40002, "db.data.svc.cluster.local")):
        handle = t.opened(inbound=False, client=(CLIENT, port), target=(SERVER, 5432), mtls=True, service=service)
        assert handle is not None
        handle.end(1, 1, "closed")
    ends = [f for f in flows(t) if f.event_type == EventType.END]
    assert [(f.source.port, f.destination.port, f.destination.service) for f in ends] == [
        (40000, 5432, "db.data.svc.cluster.local"), (40001, 5432, ""), (40002, 5432, "db.data.svc.cluster.local")]
    services = sorted(labels[9] for labels in t.metrics.series("istio_tcp_connections_opened"))  # destination_service
    assert services == ["db.data.svc.cluster.local", "unknown"]
