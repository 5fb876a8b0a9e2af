"""route(): where an enrolled pod's connection goes, as a table (ztunnel's build_request tests, in Ambit's terms)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent.mesh.model import Endpoint
from agent.mesh.store import MeshState, build_state
from agent.proxy.route import Kind, route
from hbone.identity import SpiffeId

TD = "cluster.local"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def ns(name: str, labels: Mapping[str, str] = AMBIENT, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": dict(labels),
                                              "annotations": dict(annotations or {})}}


def pod(name: str, ip: str, node: str, *, namespace: str = "shop", labels: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None, ready: bool = True, sa: str = "", ip6: str = "") -> dict[str, Any]:
    """A running pod at ``ip`` (and ``ip6`` too: a dual-stack pod, status.podIPs listing both)."""
    return {"kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
            "spec": {"nodeName": node, "serviceAccountName": sa or name,
                     "containers": [{"name": "c", "ports": [{"name": n, "containerPort": p}
                                                            for n, p in (ports or {}).items()]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": a} for a in (ip, ip6) if a],
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def svc(name: str, vip: str | None, ports: Sequence[Mapping[str, Any]], *, namespace: str = "shop",
        selector: Mapping[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": vip if vip is not None else "None", "ports": list(ports),
                     "selector": dict(selector if selector is not None else {"app": name}), **spec}}


def node(name: str, zone: str) -> dict[str, Any]:
    return {"kind": "Node", "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}


BASE = [
    ns("shop"), ns("plain", labels={}),
    node("n1", "z1"), node("n2", "z1"), node("n3", "z2"),
    pod("client", "10.0.1.1", "n1", ip6="fd00:1::1"),
    pod("web-1", "10.0.2.1", "n2", labels={"app": "web"}, ports={"http": 8080}),
    pod("web-2", "10.0.3.1", "n3", labels={"app": "web"}, ports={"http": 9090}),
    pod("web-local", "10.0.1.2", "n1", labels={"app": "web"}, ports={"http": 7070}),
    pod("api-1", "10.0.2.2", "n2", labels={"app": "api"}),  # no named port at all
    pod("legacy", "10.0.3.9", "n3", namespace="plain", labels={"app": "legacy"}),
    # dual stack: web6-1, web6-2 and db6-local have an address of each family, v4only-1 has none of IPv6
    pod("web6-1", "10.0.2.6", "n2", labels={"app": "web6"}, ip6="fd00:2::6"),
    pod("web6-2", "10.0.3.6", "n3", labels={"app": "web6"}, ip6="fd00:3::6"),
    pod("v4only-1", "10.0.2.7", "n2", labels={"app": "web6"}),
    pod("db6-local", "10.0.1.6", "n1", labels={"app": "db6"}, ip6="fd00:1::6"),
    pod("legacy6", "10.0.3.8", "n3", namespace="plain", labels={"app": "legacy6"}, ip6="fd00:3::8"),
]
DUAL: dict[str, Any] = {"clusterIPs": ["10.96.6.1", "fd00:96::6:1"], "ipFamilies": ["IPv4", "IPv6"],
        "ipFamilyPolicy": "RequireDualStack"}


def first(candidates: Sequence[Endpoint]) -> Endpoint:
    return sorted(candidates, key=lambda e: e.ip)[0]


@dataclass
class Case:
    name: str
    extra: list[dict[str, Any]]
    destination: tuple[str, int]
    kind: Kind
    target: tuple[str, int] | None = None
    dial: tuple[str, int] | None = None
    identity: str | None = None
    service: str | None = None
    reason: str = ""
    pick: Any = first
    candidates: set[str] | None = field(default=None)  # the endpoints the pick was offered


CASES = [
    Case("enrolled pod on another node: HBONE to its node", [], ("10.0.2.1", 8080), Kind.HBONE,
         target=("10.0.2.1", 8080), dial=("10.0.2.1", 15008), identity="spiffe://cluster.local/ns/shop/sa/web-1"),
    Case("enrolled pod on this node: local delivery", [], ("10.0.1.2", 7070), Kind.LOCAL, target=("10.0.1.2", 7070)),
    Case("pod outside the mesh: passthrough", [], ("10.0.3.9", 80), Kind.PASSTHROUGH, target=("10.0.3.9", 80),
         dial=("10.0.3.9", 80)),
    Case("unknown address: passthrough", [], ("192.0.2.7", 443), Kind.PASSTHROUGH, dial=("192.0.2.7", 443)),
    Case("VIP -> endpoint, numeric target port",
         [svc("api", "10.96.0.2", [{"port": 80, "targetPort": 8000}])], ("10.96.0.2", 80), Kind.HBONE,
         target=("10.0.2.2", 8000), dial=("10.0.2.2", 15008), identity="spiffe://cluster.local/ns/shop/sa/api-1",
         service="api.shop.svc.cluster.local"),
    Case("named targetPort resolved per pod; the pod without the name is skipped; same node goes local",
         [svc("web", "10.96.0.1", [{"port": 80, "targetPort": "http"}]),
          pod("web-noport", "10.0.2.3", "n2", labels={"app": "web"})],
         ("10.96.0.1", 80), Kind.LOCAL, target=("10.0.1.2", 7070), service="web.shop.svc.cluster.local",
         candidates={"10.0.2.1", "10.0.3.1", "10.0.1.2"}),
    Case("internalTrafficPolicy Local: only this node's endpoints",
         [svc("web", "10.96.0.1", [{"port": 80, "targetPort": "http"}], internalTrafficPolicy="Local")],
         ("10.96.0.1", 80), Kind.LOCAL, target=("10.0.1.2", 7070), candidates={"10.0.1.2"}),
    Case("internalTrafficPolicy Local and no endpoint here: refused",
         [svc("api", "10.96.0.2", [{"port": 80}], internalTrafficPolicy="Local")], ("10.96.0.2", 80),
         Kind.REFUSE, reason="no healthy upstream: shop/api:80"),
    Case("PreferClose: the client's zone (n1, n2 in z1) first",
         [svc("web", "10.96.0.1", [{"port": 80, "targetPort": "http"}], trafficDistribution="PreferClose")],
         ("10.96.0.1", 80), Kind.LOCAL, target=("10.0.1.2", 7070), candidates={"10.0.1.2", "10.0.2.1"}),
    Case("PreferSameNode: this node first",
         [svc("web", "10.96.0.1", [{"port": 80, "targetPort": "http"}], trafficDistribution="PreferSameNode")],
         ("10.96.0.1", 80), Kind.LOCAL, target=("10.0.1.2", 7070), candidates={"10.0.1.2"}),
    Case("Istio's annotation on the namespace sets the distribution",
         [ns("shop", annotations={"networking.istio.io/traffic-distribution": "PreferClose"}),
          svc("web", "10.96.0.1", [{"port": 80, "targetPort": "http"}])],
         ("10.96.0.1", 80), Kind.LOCAL, target=("10.0.1.2", 7070), candidates={"10.0.1.2", "10.0.2.1"}),
    Case("no endpoint for the VIP: refused at once",
         [svc("gone", "10.96.0.3", [{"port": 80}])], ("10.96.0.3", 80), Kind.REFUSE,
         service="gone.shop.svc.cluster.local", reason="no healthy upstream: shop/gone:80"),
    Case("a port the Service does not have: refused",
         [svc("api", "10.96.0.2", [{"port": 80}])], ("10.96.0.2", 81), Kind.REFUSE,
         reason="no healthy upstream: shop/api:81"),
    Case("headless Service: the pod IP is called, the workload path applies",
         [svc("api", None, [{"port": 80}])], ("10.0.2.2", 80), Kind.HBONE, target=("10.0.2.2", 80),
         dial=("10.0.2.2", 15008), identity="spiffe://cluster.local/ns/shop/sa/api-1"),
    Case("endpoint outside the mesh: plain TCP to pod:targetPort",
         [svc("legacy", "10.96.0.4", [{"port": 80, "targetPort": 8081}], namespace="plain")],
         ("10.96.0.4", 80), Kind.DIRECT, target=("10.0.3.9", 8081), dial=("10.0.3.9", 8081),
         service="legacy.plain.svc.cluster.local"),
    Case("selector-less Service: EndpointSlice addresses",
         [svc("ext", "10.96.0.5", [{"port": 443, "name": "https"}], selector={}),
          {"kind": "EndpointSlice", "metadata": {"name": "ext-1", "namespace": "shop",
                                                 "labels": {"kubernetes.io/service-name": "ext"}},
           "addressType": "IPv4", "ports": [{"name": "https", "port": 8443}],
           "endpoints": [{"addresses": ["10.0.2.1"], "nodeName": "n2"}]}],
         ("10.96.0.5", 443), Kind.HBONE, target=("10.0.2.1", 8443), dial=("10.0.2.1", 15008),
         identity="spiffe://cluster.local/ns/shop/sa/web-1", service="ext.shop.svc.cluster.local"),
    # -- IPv6 and dual stack -----------------------------------------------------------------------------
    Case("a dual-stack pod called at its IPv6 address: HBONE to [v6]:15008, the target as called",
         [], ("fd00:2::6", 8080), Kind.HBONE, target=("fd00:2::6", 8080), dial=("fd00:2::6", 15008),
         identity="spiffe://cluster.local/ns/shop/sa/web6-1"),
    Case("the same pod at its IPv4 address: IPv4 all the way", [], ("10.0.2.6", 8080), Kind.HBONE,
         target=("10.0.2.6", 8080), dial=("10.0.2.6", 15008), identity="spiffe://cluster.local/ns/shop/sa/web6-1"),
    Case("an enrolled pod of this node at its IPv6 address: local delivery", [], ("fd00:1::6", 5432), Kind.LOCAL,
         target=("fd00:1::6", 5432)),
    Case("a pod outside the mesh at its IPv6 address: passthrough", [], ("fd00:3::8", 80), Kind.PASSTHROUGH,
         target=("fd00:3::8", 80), dial=("fd00:3::8", 80)),
    Case("an unknown IPv6 address: passthrough", [], ("2001:db8::7", 443), Kind.PASSTHROUGH,
         dial=("2001:db8::7", 443)),
    Case("dual-stack Service at its IPv6 VIP: the pods' IPv6 addresses only (the IPv4-only pod is not offered)",
         [svc("web6", "10.96.6.1", [{"port": 80, "targetPort": 8080}], **DUAL)], ("fd00:96::6:1", 80), Kind.HBONE,
         target=("fd00:2::6", 8080), dial=("fd00:2::6", 15008), identity="spiffe://cluster.local/ns/shop/sa/web6-1",
         service="web6.shop.svc.cluster.local", candidates={"fd00:2::6", "fd00:3::6"}),
    Case("dual-stack Service at its IPv4 VIP: the pods' IPv4 addresses",
         [svc("web6", "10.96.6.1", [{"port": 80, "targetPort": 8080}], **DUAL)], ("10.96.6.1", 80), Kind.HBONE,
         target=("10.0.2.6", 8080), dial=("10.0.2.6", 15008), identity="spiffe://cluster.local/ns/shop/sa/web6-1",
         candidates={"10.0.2.6", "10.0.2.7", "10.0.3.6"}),
    Case("dual-stack Service, IPv6 VIP, same-node preference among the IPv6 endpoints",
         [svc("db6", "10.96.6.2", [{"port": 5432}], trafficDistribution="PreferSameNode",
              **{**DUAL, "clusterIPs": ["10.96.6.2", "fd00:96::6:2"]}),
          pod("db6-remote", "10.0.2.9", "n2", labels={"app": "db6"}, ip6="fd00:2::9")],
         ("fd00:96::6:2", 5432), Kind.LOCAL, target=("fd00:1::6", 5432), candidates={"fd00:1::6"}),
    Case("IPv6 VIP and no endpoint with an IPv6 address: refused, naming the family",
         [svc("old", "10.96.6.3", [{"port": 80}], selector={"app": "api"},
              **{**DUAL, "clusterIPs": ["10.96.6.3", "fd00:96::6:3"]})],
         ("fd00:96::6:3", 80), Kind.REFUSE, service="old.shop.svc.cluster.local",
         reason="no healthy upstream: shop/old:80 (no IPv6 endpoint)"),
    Case("IPv6-only Service: its IPv6 VIP leads to the pods' IPv6 addresses",
         [svc("web6", "fd00:96::6:4", [{"port": 80, "targetPort": 8080}], ipFamilies=["IPv6"])],
         ("fd00:96::6:4", 80), Kind.HBONE, target=("fd00:2::6", 8080), dial=("fd00:2::6", 15008),
         identity="spiffe://cluster.local/ns/shop/sa/web6-1", candidates={"fd00:2::6", "fd00:3::6"}),
    Case("IPv6 endpoint outside the mesh: plain TCP to [v6]:targetPort",
         [svc("legacy6", "fd00:96::6:5", [{"port": 80, "targetPort": 8081}], namespace="plain",
              ipFamilies=["IPv6"])],
         ("fd00:96::6:5", 80), Kind.DIRECT, target=("fd00:3::8", 8081), dial=("fd00:3::8", 8081),
         service="legacy6.plain.svc.cluster.local"),
    Case("selector-less dual-stack Service: the IPv6 EndpointSlice for the IPv6 VIP",
         [svc("ext6", "10.96.6.6", [{"port": 443, "name": "https"}], selector={},
              **{**DUAL, "clusterIPs": ["10.96.6.6", "fd00:96::6:6"]}),
          {"kind": "EndpointSlice", "metadata": {"name": "ext6-v4", "namespace": "shop",
                                                 "labels": {"kubernetes.io/service-name": "ext6"}},
           "addressType": "IPv4", "ports": [{"name": "https", "port": 8443}],
           "endpoints": [{"addresses": ["10.0.2.6"], "nodeName": "n2"}]},
          {"kind": "EndpointSlice", "metadata": {"name": "ext6-v6", "namespace": "shop",
                                                 "labels": {"kubernetes.io/service-name": "ext6"}},
           "addressType": "IPv6", "ports": [{"name": "https", "port": 8443}],
           "endpoints": [{"addresses": ["fd00:2::6"], "nodeName": "n2"}]}],
         ("fd00:96::6:6", 443), Kind.HBONE, target=("fd00:2::6", 8443), dial=("fd00:2::6", 15008),
         identity="spiffe://cluster.local/ns/shop/sa/web6-1", candidates={"fd00:2::6"}),
]


def state_with(extra: list[dict[str, Any]]) -> MeshState:
    replaced = {(o["kind"], o["metadata"]["name"]) for o in extra}
    return build_state([o for o in BASE if (o["kind"], o["metadata"]["name"]) not in replaced] + extra)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_route(case: Case) -> None:
    state = state_with(case.extra)
    offered: list[set[str]] = []

    def pick(candidates: Sequence[Endpoint]) -> Endpoint:
        offered.append({e.ip for e in candidates})
        chosen: Endpoint = case.pick(candidates)
        return chosen

    source = state.by_ip("10.0.1.1")
    assert source is not None
    r = route(source, case.destination, state, TD, pick=pick)
    assert r.kind is case.kind, r
    if case.target is not None:
        assert r.target == case.target
    assert r.dial == case.dial
    assert r.identity == (SpiffeId.parse(case.identity) if case.identity else None)
    if case.service is not None:
        assert r.service_host == case.service
    assert r.reason == case.reason
    if case.candidates is not None:
        assert offered == [case.candidates]


def test_an_endpoint_that_left_the_selector_is_never_picked() -> None:
    extra = [svc("web", "10.96.0.1", [{"port": 80, "targetPort": "http"}])]
    before = state_with(extra)
    relabelled = pod("web-2", "10.0.3.1", "n3", labels={"app": "old"}, ports={"http": 9090})
    after = state_with([*extra, relabelled])
    source = before.by_ip("10.0.1.1")
    assert source is not None
    seen = {route(source, ("10.96.0.1", 80), s, TD, pick=lambda c: max(c, key=lambda e: e.ip)).target
            for s in (before, after)}
    assert seen == {("10.0.3.1", 9090), ("10.0.2.1", 8080)}


def test_unready_pods_are_not_endpoints_unless_published() -> None:
    extra = [svc("api", "10.96.0.2", [{"port": 80}]),
             pod("api-1", "10.0.2.2", "n2", labels={"app": "api"}, ready=False)]
    source = state_with(extra).by_ip("10.0.1.1")
    assert source is not None
    assert route(source, ("10.96.0.2", 80), state_with(extra), TD).kind is Kind.REFUSE
    published = [svc("api", "10.96.0.2", [{"port": 80}], publishNotReadyAddresses=True), extra[1]]
    assert route(source, ("10.96.0.2", 80), state_with(published), TD).kind is Kind.HBONE


def test_random_choice_spreads_over_every_endpoint() -> None:
    state = state_with([svc("web", "10.96.0.1", [{"port": 80, "targetPort": "http"}])])
    source = state.by_ip("10.0.1.1")
    assert source is not None
    counts: dict[str, int] = {}
    for _ in range(600):  # bounded; each of 3 endpoints has p=1/3: below 100 is a > 5-sigma event
        target = route(source, ("10.96.0.1", 80), state, TD).target
        counts[target[0]] = counts.get(target[0], 0) + 1
    assert set(counts) == {"10.0.2.1", "10.0.3.1", "10.0.1.2"} and min(counts.values()) > 100


def test_a_single_stack_service_of_dual_stack_pods_has_their_ipv4_addresses_only() -> None:
    state = state_with([svc("web6", "10.96.6.1", [{"port": 80, "targetPort": 8080}], ipFamilies=["IPv4"])])
    assert sorted(state.endpoints["shop/web6"]) == ["10.0.2.6", "10.0.2.7", "10.0.3.6"]
    dual = state_with([svc("web6", "10.96.6.1", [{"port": 80, "targetPort": 8080}], **DUAL)])
    assert sorted(dual.endpoints["shop/web6"]) == ["10.0.2.6", "10.0.2.7", "10.0.3.6", "fd00:2::6", "fd00:3::6"]


def test_every_address_of_a_dual_stack_pod_finds_it() -> None:
    state = state_with([])
    assert state.by_ip("fd00:2::6") is state.by_ip("10.0.2.6") is not None
    source = state.by_ip("fd00:1::1")
    assert source is not None and source.key == "shop/client" and source.ips == ("10.0.1.1", "fd00:1::1")
