"""The mesh store (agent.mesh.store): indexes, endpoints as istiod computes them for ambient, snapshots that
never change once published, and a Change that lists exactly what an update changed."""

from __future__ import annotations

import copy
import random
import re
from typing import Any

import pytest

from agent.mesh.model import Endpoint, Node, Preference
from agent.mesh.store import Change, MeshState, MeshStore, ObjectError, build_state
from tests.fixtures.mesh_objects import (
    AMBIENT,
    Obj,
    endpoint_slice,
    namespace,
    node,
    pod,
    policy,
    service,
    with_meta,
)

OPT_OUT = {"istio.io/dataplane-mode": "none"}
TD = "networking.istio.io/traffic-distribution"


class Recorder:
    """A subscriber keeping every (snapshot, change) it is told."""

    def __init__(self, store: MeshStore) -> None:
        self.calls: list[tuple[MeshState, Change]] = []
        store.subscribe(lambda state, change: self.calls.append((state, change)))

    def take(self) -> list[Change]:
        changes, self.calls = [c for _, c in self.calls], []
        return changes

    def one(self) -> Change:
        changes = self.take()
        assert len(changes) == 1, changes
        return changes[0]


def store_with(*objects: Obj) -> MeshStore:
    store = MeshStore()
    assert store.apply(objects) == []
    return store


def plain(state: MeshState) -> dict[str, Any]:
    """Everything a snapshot holds, as plain values (to compare snapshots, or one snapshot over time)."""
    return {
        "namespaces": {k: dict(v) for k, v in state.namespaces.items()},
        "workloads": {ip: (w, dict(w.labels), dict(w.ports)) for ip, w in state.workloads.items()},
        "by_uid": dict(state.by_uid),
        "by_node": dict(state.by_node),
        "services": dict(state.services),
        "vips": {vip: sorted(keys) for vip, keys in state.vips.items()},
        "hostnames": dict(state.hostnames),
        "services_in": dict(state.services_in),
        "serving_at": dict(state.serving_at),
        "endpoints": {k: {ip: (e, dict(e.ports)) for ip, e in eps.items()} for k, eps in state.endpoints.items()},
        "nodes": dict(state.nodes),
        "objects": sorted(repr(o) for o in state.objects),
    }


def endpoints(state: MeshState, key: str) -> dict[str, dict[int, int]]:
    """ip -> {service port: target port} of one Service."""
    return {ip: dict(e.ports) for ip, e in state.endpoints[key].items()}


def uid(ns: str, name: str) -> str:
    return f"uid-{ns}-{name}"


# -- enrollment -------------------------------------------------------------------------------------------------
def test_enrollment_through_the_store() -> None:
    store = store_with(
        namespace("mesh", AMBIENT), namespace("plain"),
        pod("a", "mesh", "10.0.0.1"), pod("out", "mesh", "10.0.0.2", labels=OPT_OUT),
        pod("b", "plain", "10.0.1.1"), pod("c", "plain", "10.0.1.2", labels=AMBIENT),
        pod("host", "mesh", "192.168.0.1", hostNetwork=True),
        pod("side", "mesh", "10.0.0.3", annotations={"sidecar.istio.io/status": "{}"}))
    state = store.state
    assert {ip: w.enrolled for ip, w in state.workloads.items()} == {
        "10.0.0.1": True, "10.0.0.2": False, "10.0.1.1": False, "10.0.1.2": True, "10.0.0.3": False}
    assert "192.168.0.1" not in state.workloads and uid("mesh", "host") not in state.by_uid
    assert state.namespaces == {"mesh": AMBIENT, "plain": {}}


def test_pods_arriving_before_their_namespace_are_enrolled_when_it_arrives() -> None:
    store = store_with(pod("a", "late", "10.0.0.1"))
    assert not store.state.workloads["10.0.0.1"].enrolled
    assert store.apply([namespace("late", AMBIENT)]) == []
    assert store.state.workloads["10.0.0.1"].enrolled


def test_namespace_relabel_reenrolls_exactly_its_pods() -> None:
    store = store_with(
        namespace("shop", {"team": "a"}), namespace("other"),
        pod("a", "shop", "10.0.0.1"), pod("b", "shop", "10.0.0.2"),
        pod("out", "shop", "10.0.0.3", labels=OPT_OUT), pod("own", "shop", "10.0.0.4", labels=AMBIENT),
        pod("pending", "shop", None, phase="Pending"), pod("x", "other", "10.0.1.1"))
    seen = Recorder(store)

    assert store.apply([namespace("shop", {"team": "a", **AMBIENT})]) == []
    change = seen.one()
    assert set(change.workloads) == {uid("shop", "a"), uid("shop", "b")}  # not the opt-out, the self-enrolled,
    assert all(w is not None and w.enrolled for w in change.workloads.values())  # nor other namespaces' pods
    assert change.removed == {} and change.namespaces == {"shop"} and change.services == set()
    assert {w.name for w in store.state.by_uid.values() if w.enrolled} == {"a", "b", "own"}

    assert store.apply([namespace("shop", {"team": "b", **AMBIENT})]) == []  # another label: enrollment unchanged
    change = seen.one()
    assert change.workloads == {} and change.namespaces == {"shop"}

    assert store.apply(deletes=[("Namespace", "", "shop")]) == []  # gone: enrollment follows
    change = seen.one()
    assert set(change.workloads) == {uid("shop", "a"), uid("shop", "b")}
    assert not any(w.enrolled for w in store.state.by_uid.values() if w.name in ("a", "b"))
    assert "shop" not in store.state.namespaces


# -- pod IPs ----------------------------------------------------------------------------------------------------
def test_two_pods_claiming_one_ip_the_newest_holds_it() -> None:
    old = pod("old", "shop", "10.0.0.1", created="2026-01-01T00:00:00Z")
    new = pod("new", "shop", "10.0.0.1", created="2026-01-02T00:00:00Z")
    for order in ([old, new], [new, old]):
        store = store_with(*order)
        assert store.state.by_ip("10.0.0.1") is not None
        assert store.state.workloads["10.0.0.1"].name == "new"
        assert set(store.state.by_uid) == {uid("shop", "old"), uid("shop", "new")}  # both are still workloads
        assert store.apply(deletes=[("Pod", "shop", "new")]) == []
        assert store.state.workloads["10.0.0.1"].name == "old"  # the other takes over
        assert store.apply(deletes=[("Pod", "shop", "old")]) == []
        assert "10.0.0.1" not in store.state.workloads


def test_an_ip_claim_tie_is_decided_by_uid_whatever_the_order() -> None:
    a, b = pod("a", "shop", "10.0.0.1", uid="u-a"), pod("b", "shop", "10.0.0.1", uid="u-b")
    assert store_with(a, b).state.workloads["10.0.0.1"].name == "b"
    assert store_with(b, a).state.workloads["10.0.0.1"].name == "b"


def test_a_pod_changing_address_frees_the_old_one() -> None:
    store = store_with(pod("a", "shop", "10.0.0.1", ips=["fd00::1"]))
    assert set(store.state.workloads) == {"10.0.0.1", "fd00::1"}
    assert store.apply([pod("a", "shop", "10.0.0.2")]) == []
    assert set(store.state.workloads) == {"10.0.0.2"}
    assert store.state.on_node("node-a") == [store.state.workloads["10.0.0.2"]]
    assert store.state.on_node("node-b") == []


def test_workloads_by_node() -> None:
    store = store_with(pod("a", "shop", "10.0.0.1", node="n1"), pod("b", "shop", "10.0.0.2", node="n1"),
                       pod("c", "ops", "10.0.1.1", node="n2"), pod("p", "ops", None, node="n2", phase="Pending"))
    old = store.state
    assert {n: sorted(w.name for w in old.on_node(n)) for n in ("n1", "n2", "n3")} == {
        "n1": ["a", "b"], "n2": ["c"], "n3": []}
    assert store.apply([pod("b", "shop", "10.0.0.2", node="n2")], [("Pod", "ops", "c")]) == []  # rescheduled
    new = store.state
    assert sorted(w.name for w in new.on_node("n2")) == ["b"] and [w.name for w in new.on_node("n1")] == ["a"]
    assert sorted(w.name for w in old.on_node("n1")) == ["a", "b"]  # the old snapshot is as it was
    assert store.apply(deletes=[("Pod", "shop", "a"), ("Pod", "shop", "b")]) == []
    assert dict(store.state.by_node) == {}


# -- Services: VIPs, hostnames, ports ---------------------------------------------------------------------------
def test_service_indexes() -> None:
    store = store_with(
        service("web", "shop", "10.96.0.1", selector={"app": "web"}, clusterIPs=["10.96.0.1", "fd00:96::1"]),
        service("db", "shop", "None", selector={"app": "db"}),  # headless
        service("ext", "shop", None, type="ExternalName", externalName="example.com"))
    state = store.state
    assert set(state.services) == {"shop/web", "shop/db"}  # ExternalName: not in the mesh
    assert state.vips == {"10.96.0.1": ("shop/web",), "fd00:96::1": ("shop/web",)}
    assert state.hostnames == {"web.shop.svc.cluster.local": "shop/web", "db.shop.svc.cluster.local": "shop/db"}
    assert state.services["shop/db"].vips == ()
    assert state.services_in == {"shop": frozenset({"shop/web", "shop/db"})}
    web = state.service_at("fd00:96::1", 80)
    assert web is not None and web.key == "shop/web"
    assert state.service_at("10.96.0.1", 81) is None  # not a port of the Service
    assert state.service_at("10.96.0.9", 80) is None


def test_the_service_called_before_a_dnat_by_vip_or_node_port() -> None:
    """What a conntrack entry's original destination names: the VIP:port, else a node port of a Service the
    endpoint serves (``service_at`` alone knows no node ports: they live on every node address)."""
    store = store_with(
        service("web", "shop", "10.96.0.1", selector={"app": "web"}, ports=[{"port": 80, "targetPort": 8080}]),
        service("web-np", "shop", "10.96.0.2", selector={"app": "web"}, type="NodePort",
                ports=[{"port": 80, "targetPort": 8080, "nodePort": 30080}]),
        service("other-np", "shop", "10.96.0.3", selector={"app": "other"}, type="NodePort",
                ports=[{"port": 80, "targetPort": 8080, "nodePort": 30081}]),
        pod("a", "shop", "10.0.0.1", labels={"app": "web"}))
    state = store.state

    def called(original: tuple[str, int]) -> str | None:
        found = state.service_called(original, "10.0.0.1")
        return found.key if found is not None else None

    assert called(("10.96.0.1", 80)) == "shop/web"
    assert called(("10.96.0.2", 80)) == "shop/web-np"
    assert called(("192.168.1.7", 30080)) == "shop/web-np"  # a node's address, the node port
    assert called(("192.168.1.7", 30081)) is None  # a node port of a Service that does not serve the pod
    assert called(("10.96.0.1", 81)) is None


def test_a_service_turning_external_name_leaves_the_mesh() -> None:
    store = store_with(service("web", "shop", "10.96.0.1", selector={"app": "web"}))
    seen = Recorder(store)
    assert store.apply([service("web", "shop", None, type="ExternalName", externalName="example.com")]) == []
    assert seen.one().services == {"shop/web"}
    assert (store.state.services, store.state.vips, store.state.hostnames, store.state.endpoints) == ({}, {}, {}, {})


def test_target_ports_numeric_named_per_pod_and_default() -> None:
    store = store_with(
        service("web", "shop", selector={"app": "web"}, ports=[
            {"port": 80, "targetPort": "http"}, {"port": 8443, "targetPort": 9443}, {"port": 7000},
            {"port": 53, "protocol": "UDP"}]),
        pod("a", "shop", "10.0.0.1", labels={"app": "web"}, ports={"http": 8080}),
        pod("b", "shop", "10.0.0.2", labels={"app": "web"}, ports={"http": 8081}),
        pod("c", "shop", "10.0.0.3", labels={"app": "web"}))  # no port named http
    assert endpoints(store.state, "shop/web") == {
        "10.0.0.1": {80: 8080, 8443: 9443, 7000: 7000},
        "10.0.0.2": {80: 8081, 8443: 9443, 7000: 7000},
        "10.0.0.3": {8443: 9443, 7000: 7000}}  # an endpoint, but not for port 80
    serving = store.state.service_serving("10.0.0.2", 8081)  # the Service an inbound connection reached
    assert serving is not None and serving.key == "shop/web"
    assert store.state.service_serving("10.0.0.3", 8080) is None and store.state.service_serving("10.9.9.9", 80) is None
    assert store.state.endpoints["shop/web"]["10.0.0.1"] == Endpoint("10.0.0.1", "node-a", {80: 8080, 8443: 9443,
                                                                                             7000: 7000})


def test_a_pod_gaining_the_named_port_serves_it() -> None:
    store = store_with(service("web", "shop", selector={"app": "web"}, ports=[{"port": 80, "targetPort": "http"}]),
                       pod("a", "shop", "10.0.0.1", labels={"app": "web"}))
    assert endpoints(store.state, "shop/web") == {"10.0.0.1": {}}
    seen = Recorder(store)
    assert store.apply([pod("a", "shop", "10.0.0.1", labels={"app": "web"}, ports={"http": 8080})]) == []
    assert endpoints(store.state, "shop/web") == {"10.0.0.1": {80: 8080}}
    assert seen.one().services == {"shop/web"}


# -- selector endpoints -----------------------------------------------------------------------------------------
WEB = {"app": "web"}


@pytest.mark.parametrize(("overrides", "publish_not_ready", "expected"), [
    ({}, False, {"10.0.0.1": True}),
    ({"ready": None}, False, {"10.0.0.1": True}),      # no conditions: ready
    ({"ready": False}, False, {}),
    ({"deleting": True}, False, {}),
    ({"phase": "Pending", "ip": None}, False, {}),
    ({"phase": "Failed"}, False, {}),
    ({"labels": {"app": "api"}}, False, {}),           # not selected
    ({"ns": "other"}, False, {}),                      # selected labels, another namespace
    ({"ready": False}, True, {"10.0.0.1": False}),     # publishNotReadyAddresses: kept, marked not ready
    ({"deleting": True}, True, {"10.0.0.1": False}),
    ({"phase": "Pending", "ip": None}, True, {}),      # still only running pods with an address
])
def test_selector_endpoints_are_healthy_running_pods(overrides: dict[str, Any], publish_not_ready: bool,
                                                     expected: dict[str, bool]) -> None:
    settings: dict[str, Any] = {"ns": "shop", "ip": "10.0.0.1", "labels": WEB, **overrides}
    obj = pod("a", settings.pop("ns"), settings.pop("ip"), **settings)
    store = store_with(service("web", "shop", selector=WEB, publishNotReadyAddresses=publish_not_ready), obj)
    assert {ip: e.ready for ip, e in store.state.endpoints["shop/web"].items()} == expected
    # the same pod arriving first and the Service after it gives the same endpoints
    store = store_with(obj, service("web", "shop", selector=WEB, publishNotReadyAddresses=publish_not_ready))
    assert {ip: e.ready for ip, e in store.state.endpoints["shop/web"].items()} == expected


def test_a_pod_relabelled_into_and_out_of_selectors() -> None:
    store = store_with(
        service("web", "shop", "10.96.0.1", selector=WEB), service("api", "shop", "10.96.0.2", selector={"app": "api"}),
        service("all", "shop", "10.96.0.3", selector={"tier": "front"}),
        service("web", "other", "10.96.1.1", selector=WEB),
        pod("a", "shop", "10.0.0.1", labels={"app": "web", "tier": "front"}))
    assert set(store.state.endpoints["shop/web"]) == {"10.0.0.1"} and store.state.endpoints["shop/api"] == {}
    seen = Recorder(store)

    assert store.apply([pod("a", "shop", "10.0.0.1", labels={"app": "api", "tier": "front"})]) == []
    change = seen.one()
    assert change.services == {"shop/web", "shop/api"}  # not "all": its endpoint did not change
    assert store.state.endpoints["shop/web"] == {} and set(store.state.endpoints["shop/api"]) == {"10.0.0.1"}
    assert set(change.workloads) == {uid("shop", "a")}

    assert store.apply([pod("a", "shop", "10.0.0.1", labels={"app": "api", "tier": "front", "v": "2"})]) == []
    change = seen.one()  # a label no selector reads: the workload changed, no Service did
    assert change.services == set() and set(change.workloads) == {uid("shop", "a")}

    assert store.apply([pod("a", "shop", "10.0.0.1", labels={"app": "api", "tier": "front"}, ready=False)]) == []
    assert seen.one().services == {"shop/api", "shop/all"}
    assert store.state.endpoints["shop/api"] == {} and store.state.endpoints["other/web"] == {}

    assert store.apply(deletes=[("Pod", "shop", "a")]) == []
    change = seen.one()
    assert change.services == set() and change.workloads == {uid("shop", "a"): None}
    assert set(change.removed) == {uid("shop", "a")}


def test_a_service_selector_change_recomputes_its_endpoints() -> None:
    store = store_with(service("web", "shop", selector=WEB), pod("a", "shop", "10.0.0.1", labels=WEB),
                       pod("b", "shop", "10.0.0.2", labels={"app": "api"}))
    assert set(store.state.endpoints["shop/web"]) == {"10.0.0.1"}
    assert store.apply([service("web", "shop", selector={"app": "api"})]) == []
    assert set(store.state.endpoints["shop/web"]) == {"10.0.0.2"}


def test_endpoint_node_follows_the_pod() -> None:
    store = store_with(service("web", "shop", selector=WEB), pod("a", "shop", "10.0.0.1", labels=WEB, node="n1"))
    assert store.state.endpoints["shop/web"]["10.0.0.1"].node == "n1"
    assert store.apply([pod("a", "shop", "10.0.0.1", labels=WEB, node="n2")]) == []
    assert store.state.endpoints["shop/web"]["10.0.0.1"].node == "n2"


# -- EndpointSlices ---------------------------------------------------------------------------------------------
def test_slices_give_selector_less_services_their_endpoints() -> None:
    store = store_with(
        service("db", "shop", "10.96.0.5", ports=[{"name": "sql", "port": 5432}, {"name": "admin", "port": 9000}]),
        endpoint_slice("db-1", "shop", "db", ["10.1.0.1"], ports={"sql": 15432}),
        endpoint_slice("db-2", "shop", "db", ["10.1.0.2", "10.1.0.3"], ports={"sql": 25432, "admin": 29000},
                       ready=True, node="n2"))
    assert endpoints(store.state, "shop/db") == {
        "10.1.0.1": {5432: 15432}, "10.1.0.2": {5432: 25432, 9000: 29000}, "10.1.0.3": {5432: 25432, 9000: 29000}}
    assert store.state.endpoints["shop/db"]["10.1.0.2"].node == "n2"
    seen = Recorder(store)
    assert store.apply([endpoint_slice("db-2", "shop", "db", ["10.1.0.2"], ports={"sql": 25432}, ready=False)]) == []
    assert seen.one().services == {"shop/db"}
    assert endpoints(store.state, "shop/db") == {"10.1.0.1": {5432: 15432}}  # ready false: not an endpoint
    assert store.apply(deletes=[("EndpointSlice", "shop", "db-1")]) == []
    assert store.state.endpoints["shop/db"] == {}


def test_slice_readiness_and_publish_not_ready() -> None:
    slices = [endpoint_slice("s-unset", "shop", "db", ["10.1.0.1"]),
              endpoint_slice("s-true", "shop", "db", ["10.1.0.2"], ready=True),
              endpoint_slice("s-false", "shop", "db", ["10.1.0.3"], ready=False)]
    store = store_with(service("db", "shop"), *slices)
    assert {ip: e.ready for ip, e in store.state.endpoints["shop/db"].items()} == {"10.1.0.1": True, "10.1.0.2": True}
    store = store_with(service("db", "shop", publishNotReadyAddresses=True), *slices)
    assert {ip: e.ready for ip, e in store.state.endpoints["shop/db"].items()} == {
        "10.1.0.1": True, "10.1.0.2": True, "10.1.0.3": False}


def test_slice_ports_map_by_name() -> None:
    svc = service("db", "shop", ports=[{"port": 80}])  # one unnamed port each side
    store = store_with(svc, endpoint_slice("s", "shop", "db", ["10.1.0.1"], ports={"": 8080}))
    assert endpoints(store.state, "shop/db") == {"10.1.0.1": {80: 8080}}
    named = service("db", "shop", ports=[{"name": "web", "port": 80}, {"name": "metrics", "port": 9090}])
    store = store_with(named, endpoint_slice("s", "shop", "db", ["10.1.0.1"], ports={"web": 8080, "other": 1}))
    assert endpoints(store.state, "shop/db") == {"10.1.0.1": {80: 8080}}  # metrics: no slice port of that name


def test_slices_of_services_with_a_selector_are_not_read() -> None:
    store = store_with(service("web", "shop", selector=WEB), pod("a", "shop", "10.0.0.1", labels=WEB),
                       endpoint_slice("web-x", "shop", "web", ["10.0.0.1", "10.9.9.9"]))
    assert set(store.state.endpoints["shop/web"]) == {"10.0.0.1"}  # pods are the source
    assert store.apply([service("web", "shop")]) == []  # the selector removed: the slices take over
    assert set(store.state.endpoints["shop/web"]) == {"10.0.0.1", "10.9.9.9"}


def test_slices_arriving_before_their_service() -> None:
    store = store_with(endpoint_slice("db-1", "shop", "db", ["10.1.0.1"]))
    assert store.state.endpoints == {}
    assert store.apply([service("db", "shop")]) == []
    assert set(store.state.endpoints["shop/db"]) == {"10.1.0.1"}


# -- preference -------------------------------------------------------------------------------------------------
def test_preference_follows_the_namespace_annotation() -> None:
    store = store_with(namespace("shop"), service("web", "shop", "10.96.0.1", selector=WEB),
                       service("local", "shop", "10.96.0.2", selector=WEB, internalTrafficPolicy="Local"),
                       service("own", "shop", "10.96.0.3", selector=WEB, trafficDistribution="PreferSameNode"),
                       service("web", "other", "10.96.1.1", selector=WEB))
    seen = Recorder(store)
    assert store.apply([namespace("shop", annotations={TD: "PreferClose"})]) == []
    change = seen.one()
    assert change.services == {"shop/web"} and change.namespaces == {"shop"}  # only what the annotation changed
    preference = {k: s.preference for k, s in store.state.services.items()}
    assert preference == {"shop/web": Preference.SAME_ZONE, "shop/local": Preference.NODE_ONLY,
                          "shop/own": Preference.SAME_NODE, "other/web": Preference.NONE}
    assert store.apply(deletes=[("Namespace", "", "shop")]) == []
    assert store.state.services["shop/web"].preference is Preference.NONE


def test_nodes_and_zones() -> None:
    store = store_with(node("n1", "zone-a"), node("n2"))
    assert store.state.nodes == {"n1": Node("n1", "zone-a"), "n2": Node("n2", "")}
    assert (store.state.zone("n1"), store.state.zone("n2"), store.state.zone("n3")) == ("zone-a", "", "")
    seen = Recorder(store)
    assert store.apply([node("n1", "zone-b")], [("Node", "", "n2")]) == []
    change = seen.one()
    assert change.nodes and not change.services and not change.workloads
    assert store.state.nodes == {"n1": Node("n1", "zone-b")}


# -- deletion, shared VIPs --------------------------------------------------------------------------------------
def test_a_deleted_service_leaves_no_trace() -> None:
    store = store_with(service("web", "shop", "10.96.0.1", selector=WEB), pod("a", "shop", "10.0.0.1", labels=WEB))
    seen = Recorder(store)
    assert store.apply(deletes=[("Service", "shop", "web")]) == []
    assert seen.one().services == {"shop/web"}
    state = store.state
    assert (state.services, state.vips, state.hostnames, state.endpoints) == ({}, {}, {}, {})
    assert state.services_in == {} and state.service_at("10.96.0.1", 80) is None
    assert set(state.workloads) == {"10.0.0.1"}  # the pod stays
    assert store.apply([pod("a", "shop", "10.0.0.1", labels={"app": "web", "v": "2"})]) == []  # nothing to refresh
    assert store.state.endpoints == {}


def test_services_sharing_a_vip() -> None:
    store = store_with(service("web", "a", "10.96.0.1", selector=WEB),
                       service("web", "b", "10.96.0.1", selector=WEB),
                       service("api", "b", "10.96.0.1", selector=WEB, ports=[{"port": 9090}]))
    state = store.state
    assert sorted(state.vips["10.96.0.1"]) == ["a/web", "b/api", "b/web"]

    def at(port: int, client: str = "") -> str | None:
        svc = state.service_at("10.96.0.1", port, client)
        return svc.key if svc is not None else None

    assert at(80, "b") == "b/web" and at(80, "a") == "a/web"   # the client's namespace first
    assert at(80, "c") in ("a/web", "b/web")                     # else one of them
    assert at(9090, "a") == "b/api"                              # only one has the port
    assert store.apply(deletes=[("Service", "a", "web")]) == []
    assert sorted(store.state.vips["10.96.0.1"]) == ["b/api", "b/web"]
    assert store.apply(deletes=[("Service", "b", "web"), ("Service", "b", "api")]) == []
    assert store.state.vips == {}


# -- snapshots and changes --------------------------------------------------------------------------------------
def _busy_cluster() -> list[Obj]:
    return [namespace("shop", AMBIENT), namespace("ops"), node("node-a", "z1"), policy("allow", "shop"),
            service("web", "shop", "10.96.0.1", selector=WEB, ports=[{"port": 80, "targetPort": "http"}]),
            service("db", "shop", "10.96.0.2"), endpoint_slice("db-1", "shop", "db", ["10.1.0.1"]),
            *(pod(f"web-{i}", "shop", f"10.0.0.{i + 1}", labels=WEB, ports={"http": 8080}) for i in range(5)),
            pod("tool", "ops", "10.0.1.1")]


def test_published_snapshots_never_change() -> None:
    store = store_with(*_busy_cluster())
    old = store.state
    before = copy.deepcopy(plain(old))
    errors = store.apply(
        [namespace("shop"), namespace("ops", AMBIENT), node("node-a", "z2"), node("node-b"), policy("deny", "ops"),
         service("web", "shop", "10.96.0.9", selector={"app": "api"}), service("db", "shop", "10.96.0.2", ports=[]),
         endpoint_slice("db-1", "shop", "db", ["10.1.0.2"]), pod("web-0", "shop", "10.0.0.1", labels={"app": "api"}),
         pod("web-1", "shop", "10.0.0.200", labels=WEB, ready=False), pod("new", "shop", "10.0.0.50", labels=WEB),
         pod("web-2", "shop", "10.0.0.3", labels={"app": 5})],  # type: ignore[dict-item]
        [("Pod", "shop", "web-3"), ("AuthorizationPolicy", "shop", "allow"), ("Service", "shop", "db")])
    assert [str(e) for e in errors] == ["Pod shop/web-2: metadata.labels must map strings to strings"]
    assert plain(store.state) != before  # everything above changed the store...
    assert plain(old) == before          # ...and nothing of the snapshot held before it


def test_subscribers_get_exactly_what_changed() -> None:
    store = store_with(*_busy_cluster())
    seen = Recorder(store)
    assert store.apply([pod("new", "shop", "10.0.0.50", labels=WEB, ports={"http": 8080})]) == []
    state, change = seen.calls[0]
    assert state is store.state
    assert change.workloads == {uid("shop", "new"): store.state.by_uid[uid("shop", "new")]}
    assert change.services == {"shop/web"} and change.removed == {}
    assert not (change.namespaces or change.objects or change.nodes)

    seen.take()
    assert store.apply([policy("deny", "ops")]) == []
    change = seen.one()
    assert change.objects and not (change.workloads or change.services or change.namespaces or change.nodes)


def test_nothing_changed_nobody_is_told() -> None:
    objects = _busy_cluster()
    store = store_with(*objects)
    seen = Recorder(store)
    state = store.state
    assert store.apply(objects) == []  # the very same objects
    typed = [o for o in objects if o["kind"] != "AuthorizationPolicy"]  # policies are their parser's business
    assert store.apply([with_meta(o, resourceVersion="2") for o in typed]) == []  # writes the mesh does not read
    heartbeat = pod("tool", "ops", "10.0.1.1")
    heartbeat["status"]["conditions"][1]["lastProbeTime"] = "2026-01-01T00:01:00Z"
    assert store.apply([heartbeat], [("Pod", "shop", "missing")]) == []
    assert store.apply([service("web", "shop", "10.96.0.1", selector=WEB,
                                ports=[{"port": 80, "targetPort": "http"}], sessionAffinity="None")]) == []
    assert seen.take() == []
    assert store.state is state


def test_replace_all_applies_only_the_differences() -> None:
    objects = _busy_cluster()
    store = MeshStore()
    assert store.replace_all(objects) == []
    seen = Recorder(store)
    assert store.replace_all(copy.deepcopy(objects)) == []
    assert seen.take() == []

    changed = [o for o in copy.deepcopy(objects) if o["metadata"]["name"] != "tool"]  # ops/tool deleted
    web4 = next(o for o in changed if o["metadata"]["name"] == "web-4")
    web4["metadata"]["labels"] = {"app": "api"}
    assert store.replace_all(changed) == []
    change = seen.one()
    web4_uid = uid("shop", "web-4")
    assert change.workloads == {uid("ops", "tool"): None, web4_uid: store.state.by_uid[web4_uid]}
    assert set(change.removed) == {uid("ops", "tool")}
    assert change.services == {"shop/web"} and not (change.namespaces or change.objects or change.nodes)
    assert plain(store.state) == plain(build_state(changed))


def test_replace_all_reports_unidentifiable_objects_and_applies_the_rest() -> None:
    store = MeshStore()
    errors = store.replace_all([namespace("shop"), {"kind": "Pod", "metadata": {"name": 5}}, "junk",
                                pod("a", "shop", "10.0.0.1")])
    assert [str(e) for e in errors] == [
        "Pod: metadata.name must be a non-empty string, not 5",
        "every item must be a Kubernetes object (a mapping), not str"]
    assert set(store.state.workloads) == {"10.0.0.1"} and set(store.state.namespaces) == {"shop"}


# -- invalid objects --------------------------------------------------------------------------------------------
def _bad(kind: str) -> Obj:
    """A well-identified object of ``kind`` with one malformed field."""
    if kind == "Namespace":
        return namespace("shop", {"a": 1})  # type: ignore[dict-item]
    if kind == "Pod":
        return pod("a", "shop", "not-an-ip")
    if kind == "Service":
        return service("web", "shop", selector=WEB, ports=[{"port": 0}])
    if kind == "EndpointSlice":
        return endpoint_slice("db-1", "shop", "db", ["10.1.0.999"])
    return {**node("n1"), "metadata": {"name": "n1", "labels": ["zone"]}}


@pytest.mark.parametrize(("kind", "message"), [
    ("Namespace", "Namespace shop: metadata.labels must map strings to strings"),
    ("Pod", "Pod shop/a: status.podIP 'not-an-ip' is not an IP address"),
    ("Service", "Service shop/web: spec.ports[0].port must be a port number 1-65535, not 0"),
    ("EndpointSlice", "EndpointSlice shop/db-1: endpoints[0].addresses[0] '10.1.0.999' is not an IP address"),
    ("Node", "Node n1: metadata.labels must be a mapping, not list"),
])
def test_an_invalid_object_is_rejected_and_its_previous_version_removed(kind: str, message: str) -> None:
    good = [namespace("shop", AMBIENT), pod("a", "shop", "10.0.0.1", labels=WEB), node("n1", "z1"),
            service("web", "shop", "10.96.0.1", selector=WEB), service("db", "shop", "10.96.0.2"),
            endpoint_slice("db-1", "shop", "db", ["10.1.0.1"])]
    store = store_with(*good)
    bad = _bad(kind)
    errors = store.apply([pod("b", "shop", "10.0.0.2", labels=WEB), bad, pod("c", "shop", "10.0.0.3")])
    assert [str(e) for e in errors] == [message]
    assert all(isinstance(e, ObjectError) for e in errors)
    expected = build_state([o for o in good if (o["kind"], o["metadata"]["name"]) != (kind, bad["metadata"]["name"])]
                           + [pod("b", "shop", "10.0.0.2", labels=WEB), pod("c", "shop", "10.0.0.3")])
    assert plain(store.state) == plain(expected)  # as if the bad object had never been given; the rest applied


@pytest.mark.parametrize("kind", ["Namespace", "Pod", "Service", "EndpointSlice", "Node", "AuthorizationPolicy"])
@pytest.mark.parametrize(("metadata", "message"), [
    (["name", "x"], "{kind}: metadata must be a mapping, not list"),
    ("x", "{kind}: metadata must be a mapping, not str"),
    ({"name": 7, "namespace": "shop"}, "{kind}: metadata.name must be a non-empty string, not 7"),
    ({"name": "", "namespace": "shop"}, "{kind}: metadata.name must be a non-empty string, not ''"),
    ({"name": "x", "namespace": False}, "{kind} x: metadata.namespace must be a non-empty string, not False"),
    ({"name": "x", "namespace": ""}, "{kind} x: metadata.namespace must be a non-empty string, not ''"),
    ({"name": "x", "namespace": 0}, "{kind} x: metadata.namespace must be a non-empty string, not 0"),
])
def test_malformed_metadata_of_every_kind(kind: str, metadata: Any, message: str) -> None:
    store = store_with(namespace("shop"), pod("a", "shop", "10.0.0.1"))
    seen = Recorder(store)
    errors = store.apply([{"kind": kind, "metadata": metadata}, pod("b", "shop", "10.0.0.2")])
    cluster_scoped = kind in ("Namespace", "Node")
    if cluster_scoped and isinstance(metadata, dict) and metadata.get("name") == "x":
        assert errors == []  # a cluster-scoped object's namespace is not read
        return
    assert [str(e) for e in errors] == [message.format(kind=kind)]
    assert set(store.state.workloads) == {"10.0.0.1", "10.0.0.2"}  # the rest applied
    assert set(seen.one().workloads) == {uid("shop", "b")}


def test_a_pod_taking_another_pods_uid_is_rejected_and_leaves_no_stale_endpoint() -> None:
    store = store_with(service("web", "shop", selector=WEB), pod("a", "shop", "10.0.0.1", labels=WEB, uid="u-a"),
                       pod("b", "shop", "10.0.0.2", labels=WEB, uid="u-b"))
    errors = store.apply([pod("a", "shop", "10.0.0.1", labels=WEB, uid="u-b")])
    assert [str(e) for e in errors] == ["Pod shop/a: metadata.uid u-b is also shop/b's"]
    expected = build_state([service("web", "shop", selector=WEB), pod("b", "shop", "10.0.0.2", labels=WEB, uid="u-b")])
    assert plain(store.state) == plain(expected)


def test_build_state_raises_the_first_error() -> None:
    with pytest.raises(ObjectError, match=re.escape("Pod shop/a: status.podIP 'x' is not an IP address")):
        build_state([namespace("shop"), pod("a", "shop", "x"), service("web", "shop", ports=[{"port": 0}])])
    with pytest.raises(ObjectError, match=re.escape("Pod shop/b: status.podIPs: 10.0.0.1 is also shop/a's")):
        build_state([pod("a", "shop", "10.0.0.1"), pod("b", "shop", "10.0.0.1")])


# -- deltas agree with a rebuild --------------------------------------------------------------------------------
def _random_object(rng: random.Random) -> Obj:
    ns = rng.choice(["shop", "ops"])
    roll = rng.random()
    if roll < 0.5:
        i = rng.randrange(8)
        return pod(f"p{i}", ns, rng.choice([f"10.{ns == 'ops':d}.0.{i + 1}", f"10.{ns == 'ops':d}.0.{i + 11}", None]),
                   ips=rng.choice([(), (f"fd00:{ns == 'ops':d}::{i + 1}",), (f"fd00:{ns == 'ops':d}::{i + 11}",)]),
                   labels={"app": rng.choice(["web", "api"]), **rng.choice([{}, AMBIENT, OPT_OUT])},
                   ready=rng.choice([True, False, None]), deleting=rng.random() < 0.1,
                   ports=rng.choice([{}, {"http": 8080}, {"http": 8081}]), node=rng.choice(["n1", "n2"]))
    if roll < 0.7:
        i = rng.randrange(3)
        vip = f"10.96.{ns == 'ops':d}.{i + 1}"
        families: dict[str, Any] = rng.choice([{}, {"ipFamilies": ["IPv4"]},
                               {"ipFamilies": ["IPv4", "IPv6"], "clusterIPs": [vip, f"fd00:96::{i + 1}"]}])
        return service(f"s{i}", ns, vip,
                       selector=rng.choice([None, {"app": "web"}, {"app": "api"}]),
                       ports=[{"name": "http", "port": 80, "targetPort": rng.choice(["http", 8080])}],
                       publishNotReadyAddresses=rng.random() < 0.3, **families)
    if roll < 0.8:
        return endpoint_slice(f"s{rng.randrange(3)}-x", ns, f"s{rng.randrange(3)}", [f"10.5.0.{rng.randrange(4)}"],
                              ports={"http": 9000}, ready=rng.choice([True, False, None]))
    if roll < 0.9:
        return namespace(ns, rng.choice([{}, AMBIENT]), rng.choice([{}, {TD: "PreferClose"}]))
    return node(rng.choice(["n1", "n2"]), rng.choice(["", "z1", "z2"]))


@pytest.mark.parametrize("seed", range(6))
def test_deltas_reach_the_state_a_rebuild_would(seed: int) -> None:
    """A random history of events applied one by one, checked against a store built from the objects as they
    stand (in a shuffled order) after every step."""
    rng = random.Random(seed)
    store = MeshStore()
    current: dict[tuple[str, str, str], Obj] = {}
    for _ in range(150):
        obj = _random_object(rng)
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if key in current and rng.random() < 0.25:
            del current[key]
            assert store.apply(deletes=[key]) == []
        else:
            current[key] = obj
            assert store.apply([obj]) == []
        objects = list(current.values())
        rng.shuffle(objects)
        assert plain(store.state) == plain(build_state(objects))


def test_two_pods_at_one_address_in_one_service_the_newest_is_the_endpoint() -> None:
    old = pod("old", "shop", "10.0.0.1", labels=WEB, node="n1", created="2026-01-01T00:00:00Z")
    new = pod("new", "shop", "10.0.0.1", labels=WEB, node="n2", created="2026-01-02T00:00:00Z")
    for order in ([old, new], [new, old]):
        store = store_with(service("web", "shop", selector=WEB), *order)
        assert store.state.endpoints["shop/web"]["10.0.0.1"].node == "n2"
        assert store.apply([pod("new", "shop", "10.0.0.1", labels=WEB, node="n2", ready=False,
                                created="2026-01-02T00:00:00Z")]) == []
        assert store.state.endpoints["shop/web"]["10.0.0.1"].node == "n1"  # the newest is not healthy: the other
        assert store.apply(deletes=[("Pod", "shop", "old")]) == []
        assert store.state.endpoints["shop/web"] == {}


def test_a_policy_status_write_is_no_change() -> None:
    """Istio writes status on policies; a new resourceVersion or status must not make the engine re-read them."""
    store = MeshStore()
    policy: dict[str, Any] = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "p", "namespace": "shop", "resourceVersion": "1"}, "spec": {"action": "DENY"}}
    store.apply([policy])
    changes: list[Change] = []
    store.subscribe(lambda _state, change: changes.append(change))
    store.apply([{**policy, "metadata": {**policy["metadata"], "resourceVersion": "2"}, "status": {"x": "y"}}])
    assert changes == []
    store.apply([{**policy, "spec": {"action": "ALLOW"}}])
    assert len(changes) == 1 and changes[0].objects


def test_the_service_serving_an_endpoints_port_is_found_by_its_address() -> None:
    """The destination's guess of the Service of an inbound connection that named none: an index by endpoint
    address, kept by every change of endpoints (here: the Service added, the pod relabelled out, back in)."""
    pod: dict[str, Any] = {"kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
           "spec": {"nodeName": "n1"}, "status": {"phase": "Running", "podIP": "10.0.0.1"}}
    svc = {"kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    store = MeshStore()
    assert store.apply([pod]) == [] and store.state.service_serving("10.0.0.1", 8080) is None
    store.apply([svc])
    found = store.state.service_serving("10.0.0.1", 8080)
    assert found is not None and found.key == "shop/web"
    assert store.state.service_serving("10.0.0.1", 9090) is None  # not a port the Service targets
    store.apply([{**pod, "metadata": {**pod["metadata"], "labels": {"app": "old"}}}])
    assert store.state.service_serving("10.0.0.1", 8080) is None and dict(store.state.serving_at) == {}
    store.apply([pod])
    assert store.state.serving_at == {"10.0.0.1": frozenset({"shop/web"})}


def test_a_dual_stack_pod_is_an_endpoint_at_each_address_its_service_has_a_family_for() -> None:
    dual: dict[str, Any] = {"clusterIPs": ["10.96.0.1", "fd00:96::1"], "ipFamilies": ["IPv4", "IPv6"]}
    web = pod("web-1", "shop", "10.0.0.1", ips=["fd00::1"], labels=WEB, ports={"http": 8080})
    store = store_with(service("web", "shop", selector=WEB, ports=[{"port": 80, "targetPort": "http"}], **dual),
                       service("web4", "shop", "10.96.0.2", selector=WEB, ports=[{"port": 80, "targetPort": "http"}],
                               ipFamilies=["IPv4"]),
                       service("web6", "shop", "fd00:96::3", selector=WEB, ports=[{"port": 80, "targetPort": "http"}],
                               ipFamilies=["IPv6"]),
                       web)
    state = store.state
    assert endpoints(state, "shop/web") == {"10.0.0.1": {80: 8080}, "fd00::1": {80: 8080}}
    assert endpoints(state, "shop/web4") == {"10.0.0.1": {80: 8080}}
    assert endpoints(state, "shop/web6") == {"fd00::1": {80: 8080}}
    assert state.vips == {"10.96.0.1": ("shop/web",), "fd00:96::1": ("shop/web",), "10.96.0.2": ("shop/web4",),
                          "fd00:96::3": ("shop/web6",)}
    found = state.service_serving("fd00::1", 8080)
    assert found is not None and found.key in ("shop/web", "shop/web6")
    # the pod's IPv6 address changes: the old endpoint goes, the new one comes, the IPv4 one stays
    assert store.apply([pod("web-1", "shop", "10.0.0.1", ips=["fd00::2"], labels=WEB, ports={"http": 8080})]) == []
    assert endpoints(store.state, "shop/web") == {"10.0.0.1": {80: 8080}, "fd00::2": {80: 8080}}
    assert store.state.by_ip("fd00::1") is None and store.state.by_ip("fd00::2") is store.state.by_ip("10.0.0.1")
    assert "fd00::1" not in store.state.serving_at
    # relabelled out: no endpoint at either address
    assert store.apply([pod("web-1", "shop", "10.0.0.1", ips=["fd00::2"], labels={"app": "old"})]) == []
    assert endpoints(store.state, "shop/web") == {} and dict(store.state.serving_at) == {}


def test_a_headless_service_without_families_takes_both() -> None:
    store = store_with(service("db", "shop", None, selector=WEB, clusterIP="None"),
                       pod("db-1", "shop", "10.0.0.1", ips=["fd00::1"], labels=WEB))
    assert sorted(store.state.endpoints["shop/db"]) == ["10.0.0.1", "fd00::1"]
