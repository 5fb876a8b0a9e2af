"""Metrics: the families and exact label sets dashboards expect, read back through prometheus_client's own
text parser; Istio's label derivation; forgetting deleted pods; health gauges."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.telemetry.exposition import text
from agent.telemetry.metrics import TRAFFIC_LABELS, Metrics, canonical_revision, canonical_service, traffic_labels
from agent.telemetry.model import Endpoint
from agent.telemetry.recorder import FlowRecorder

CLIENT = Endpoint("10.1.0.7", 41000, "spiffe://cluster.local/ns/shop/sa/client", "shop", "client-5f7c-x2",
                  {"app": "client", "version": "v2"}, workload="client")
WEB = Endpoint("10.1.0.8", 8080, "spiffe://cluster.local/ns/shop/sa/web", "shop", "web-0",
               {"app.kubernetes.io/name": "web", "service.istio.io/canonical-revision": "r7"},
               service="web.shop.svc.cluster.local")
OUTSIDE = Endpoint("192.168.7.1", 55000)

ISTIO = ("istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_sent_bytes",
         "istio_tcp_received_bytes", "istio_tcp_connections_failed")
HUBBLE = {"hubble_flows_processed": {"type", "subtype", "verdict"}, "hubble_drop": {"reason", "protocol"},
          "hubble_tcp_flags": {"flag", "family"}, "hubble_lost_events": {"source"}}


def scrape(metrics: Metrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    exposition = text(metrics.families()).decode()
    return {fam.name: [(s.name, s.labels, s.value) for s in fam.samples]
            for fam in text_string_to_metric_families(exposition)}


def value(samples: list[tuple[str, dict[str, str], float]], **labels: str) -> float:
    matching = [v for _n, lab, v in samples if all(lab.get(k) == x for k, x in labels.items())]
    assert matching, f"no sample with {labels} in {samples}"
    return sum(matching)


def traffic(metrics: Metrics) -> FlowRecorder:
    rec = FlowRecorder("node-1", metrics=metrics)
    ok = rec.start(direction="EGRESS", reporter="source", source=CLIENT, destination=WEB, mtls=True)
    ok.end(300, 7000, "closed by client")
    bad = rec.start(direction="EGRESS", reporter="source", source=CLIENT, destination=OUTSIDE, mtls=False)
    bad.end(0, 0, "connection refused", error=True)
    rec.drop(direction="INGRESS", reporter="destination", source=CLIENT, destination=WEB, mtls=True,
             reason="denied by AuthorizationPolicy shop/deny rule 0", policy="shop/deny")
    return rec


def test_istio_families_and_exact_labels() -> None:
    metrics = Metrics()
    traffic(metrics)
    fams = scrape(metrics)
    for name in ISTIO:
        samples = fams[name]
        assert all(n == f"{name}_total" for n, _l, _v in samples), "counters only, no _created series"
        for _n, labels, _v in samples:
            assert tuple(sorted(labels)) == tuple(sorted(TRAFFIC_LABELS))
    opened = fams["istio_tcp_connections_opened"]
    ok = dict(reporter="source", response_flags="-", connection_security_policy="mutual_tls",
              destination_workload="web-0")
    assert value(opened, **ok) == 1
    sample = next(lab for _n, lab, _v in opened if lab["destination_workload"] == "web-0"
                  and lab["reporter"] == "source")
    assert sample == {
        "reporter": "source", "source_workload": "client", "source_canonical_service": "client",
        "source_canonical_revision": "v2", "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/client", "source_app": "client",
        "source_version": "v2", "source_cluster": "Kubernetes",
        "destination_service": "web.shop.svc.cluster.local", "destination_service_namespace": "shop",
        "destination_service_name": "web", "destination_workload": "web-0",
        "destination_canonical_service": "web", "destination_canonical_revision": "r7",
        "destination_workload_namespace": "shop", "destination_principal": "spiffe://cluster.local/ns/shop/sa/web",
        "destination_app": "web", "destination_version": "r7", "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "mutual_tls",
    }
    # Istio's byte directions: "received" is the request (source -> destination), "sent" the response
    assert value(fams["istio_tcp_received_bytes"], **ok) == 300
    assert value(fams["istio_tcp_sent_bytes"], **ok) == 7000
    assert value(fams["istio_tcp_connections_closed"], **ok) == 1
    # the refused upstream: closed and failed with CONNECT, destination unknown
    failed = fams["istio_tcp_connections_failed"]
    assert value(failed, response_flags="CONNECT", destination_workload="unknown",
                 destination_principal="unknown", connection_security_policy="unknown") == 1
    # the policy denial: opened, closed and failed with DENY, reported by the destination
    for name in ("istio_tcp_connections_opened", "istio_tcp_connections_closed", "istio_tcp_connections_failed"):
        assert value(fams[name], response_flags="DENY", reporter="destination") == 1


def test_hubble_families() -> None:
    metrics = Metrics()
    traffic(metrics)
    metrics.lost_events("PERF_EVENT_RING_BUFFER", 3)
    metrics.tcp_flags(["SYN", "SYN-ACK"], "IPv4")
    fams = scrape(metrics)
    for name, labels in HUBBLE.items():
        assert fams[name], name
        assert all(n == f"{name}_total" and set(lab) == labels for n, lab, _v in fams[name])
    flows = fams["hubble_flows_processed"]
    assert value(flows, type="Trace", subtype="start", verdict="FORWARDED") == 2
    assert value(flows, type="Trace", subtype="end", verdict="ERROR") == 1
    assert value(flows, type="Drop", subtype="drop", verdict="DROPPED") == 1
    assert value(fams["hubble_drop"], reason="POLICY_DENIED", protocol="TCP") == 1
    assert value(fams["hubble_lost_events"], source="PERF_EVENT_RING_BUFFER") == 3
    assert value(fams["hubble_tcp_flags"], flag="SYN-ACK", family="IPv4") == 1


def test_health_gauges() -> None:
    metrics = Metrics(clock=lambda: 1000.0)
    metrics.set_workloads(enrolled=3, not_enrolled=1)
    metrics.set_certificate_expiry("spiffe://cluster.local/ns/shop/sa/web", 1000.0 + 86400)
    metrics.set_certificate_expiry("spiffe://cluster.local/ns/shop/sa/old", 990.0)
    metrics.forget_certificate("spiffe://cluster.local/ns/shop/sa/old")
    metrics.set_ebpf_attachments([("ambit_pod_ingress", "tcx"), ("ambit_pod_ingress", "tcx"),
                                  ("ambit_uplink_ingress", "tcx")])
    fams = scrape(metrics)
    assert value(fams["ambit_workloads"], enrolled="true") == 3
    assert value(fams["ambit_workloads"], enrolled="false") == 1
    assert [(lab, v) for _n, lab, v in fams["ambit_certificate_expiry_seconds"]] == \
        [({"identity": "spiffe://cluster.local/ns/shop/sa/web"}, 86400.0)]
    assert value(fams["ambit_ebpf_attached"], program="ambit_pod_ingress", backend="tcx") == 2
    metrics.set_ebpf_attachments([])
    assert scrape(metrics).get("ambit_ebpf_attached", []) == []


def test_forget_workload_removes_its_series_only() -> None:
    metrics = Metrics()
    rec = traffic(metrics)
    other = Endpoint("10.1.0.9", 8080, "spiffe://cluster.local/ns/shop/sa/web", "shop", "web-1",
                     {"app.kubernetes.io/name": "web"})
    rec.start(direction="EGRESS", reporter="source", source=OUTSIDE, destination=other, mtls=False).end(1, 1, "eof")
    before = {name: len(s) for name, s in scrape(metrics).items()}
    removed = metrics.forget_workload("shop", "web-0")
    after = scrape(metrics)
    assert removed > 0
    for name in ISTIO:
        for _n, labels, _v in after.get(name, []):
            assert "web-0" not in labels.values(), (name, labels)
    # series that never involved web-0 are kept (client -> outside, outside -> web-1)
    assert value(after["istio_tcp_connections_failed"], response_flags="CONNECT") == 1
    assert value(after["istio_tcp_connections_opened"], destination_workload="web-1") == 1
    assert len(after["istio_tcp_connections_opened"]) < before["istio_tcp_connections_opened"]
    assert metrics.forget_workload("shop", "web-0") == 0


def test_series_fed_by_a_live_pod_survive_and_late_closes_stay_forgotten() -> None:
    series_fed_by_a_live_pod_survive_and_late_closes_stay_forgotten()


async def test_the_same_with_connections_journaled_on_the_event_loop() -> None:
    """On a loop the recorder counts a batch at a time: forgetting a pod counts what waits first, so a connection
    started before its pod went is forgotten with it, and its close does not bring it back."""
    series_fed_by_a_live_pod_survive_and_late_closes_stay_forgotten()


def series_fed_by_a_live_pod_survive_and_late_closes_stay_forgotten() -> None:
    metrics = Metrics()
    rec = FlowRecorder("node-1", metrics=metrics)
    a = Endpoint("10.1.0.1", 1, None, "shop", "api-a", {"app": "api"}, workload="api")
    b = Endpoint("10.1.0.2", 1, None, "shop", "api-b", {"app": "api"}, workload="api")
    rec.start(direction="INGRESS", reporter="destination", source=OUTSIDE, destination=a, mtls=False).end(1, 1, "x")
    rec.start(direction="INGRESS", reporter="destination", source=OUTSIDE, destination=b, mtls=False).end(1, 1, "x")
    assert len(metrics.series("istio_tcp_connections_opened")) == 1  # one series for the workload "api"
    metrics.forget_workload("shop", "api-a")
    assert metrics.series("istio_tcp_connections_opened")  # api-b still feeds it
    still_open = rec.start(direction="INGRESS", reporter="destination", source=OUTSIDE, destination=b, mtls=False)
    metrics.forget_workload("shop", "api-b")
    assert metrics.series("istio_tcp_connections_opened") == {}
    still_open.end(5, 5, "reset: pod deleted")  # must not bring the deleted pod's series back
    for family in ("istio_tcp_connections_closed", "istio_tcp_sent_bytes", "istio_tcp_received_bytes"):
        assert metrics.series(family) == {}, family


@pytest.mark.parametrize(("labels", "workload", "service", "revision"), [
    ({"service.istio.io/canonical-name": "a", "app.kubernetes.io/name": "b", "app": "c"}, "w", "a", "latest"),
    ({"app.kubernetes.io/name": "b", "app": "c", "app.kubernetes.io/version": "1.2"}, "w", "b", "1.2"),
    ({"app": "c", "version": "v3"}, "w", "c", "v3"),
    ({}, "w", "w", "latest"),
    ({}, "", "unknown", "latest"),
])
def test_istio_canonical_names(labels: dict[str, str], workload: str, service: str, revision: str) -> None:
    assert canonical_service(labels, workload) == service
    assert canonical_revision(labels) == revision


def test_unknown_endpoints_are_unknown() -> None:
    labels = dict(zip(TRAFFIC_LABELS, traffic_labels("source", OUTSIDE, OUTSIDE, False), strict=True))
    assert {k: v for k, v in labels.items() if v != "unknown"} == {"reporter": "source", "request_protocol": "tcp",
                                                                  "response_flags": "-"}


def test_remembered_label_values_follow_a_pod_relabelled_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Label values are remembered per connection shape: a pod's new labels (a new mapping, as the store makes
    one per change) give new series, its old labels the old ones; the memory starts over when full."""
    monkeypatch.setattr("agent.telemetry.metrics.TRAFFIC_MEMORY", 3)
    metrics = Metrics()
    relabelled = Endpoint(WEB.ip, WEB.port, WEB.identity, WEB.namespace, WEB.pod_name,
                          {**WEB.labels, "service.istio.io/canonical-revision": "r8"}, service=WEB.service)
    for destination in (WEB, relabelled, WEB, OUTSIDE, CLIENT, relabelled):
        metrics.connection_opened("source", CLIENT, destination, True).close(1, 2)
    assert len(metrics._traffic_memory) <= 3
    opened = metrics.series("istio_tcp_connections_opened")
    expected = {traffic_labels("source", CLIENT, d, True): n
                for d, n in ((WEB, 2), (relabelled, 2), (OUTSIDE, 1), (CLIENT, 1))}
    assert opened == expected
    assert sorted(labels[14] for labels in opened) == ["r7", "r8", "unknown", "v2"]


def test_series_counted_again_after_their_pod_was_forgotten_are_forgotten_with_it_again() -> None:
    """A connection shape's feeds are registered once per epoch: after a forget they must be registered anew,
    or the next forget of that pod would leave its series behind."""
    metrics = Metrics()
    for _round in range(3):
        for _ in range(2):
            metrics.connection_opened("destination", CLIENT, WEB, True).close(10, 20)
        assert set(metrics.series("istio_tcp_connections_opened").values()) == {2}
        assert set(metrics.series("istio_tcp_sent_bytes").values()) == {40}
        assert metrics.forget_workload("shop", "web-0") == 4  # opened, closed, sent, received
        assert all(not metrics.series(f) for f in ("istio_tcp_connections_opened", "istio_tcp_connections_closed",
                                                   "istio_tcp_sent_bytes", "istio_tcp_received_bytes"))
