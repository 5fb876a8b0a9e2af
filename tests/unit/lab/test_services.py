"""What the lab's API server does with Services: cluster IPs (kept, allocated, refused) and the validation of
Services and EndpointSlices, each error naming the object and the field; and the mesh view made from a state
holding an object the agents would refuse."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.lab import services
from agent.lab.state import LabObjects
from agent.lab.topology import SERVICE_CIDR
from agent.mesh.convert import ObjectError
from tests.unit.lab import objects as o


def state(*objs: dict[str, Any]) -> LabObjects:
    return LabObjects([o.namespace("default"), o.namespace("shop"), *objs])


def admitted(st: LabObjects, *batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch as admit() completes it; fails on any error."""
    objs = [copy.deepcopy(b) for b in batch]
    assert services.admit(st, objs) == []
    return objs


def ips(objs: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    return [(obj["spec"]["clusterIP"], obj["spec"]["clusterIPs"]) for obj in objs]


def test_a_service_keeps_the_cluster_ip_it_is_given_else_gets_the_lowest_free_one() -> None:
    st = state(o.service("old", clusterIP="10.96.0.1", clusterIPs=["10.96.0.1"]))
    objs = admitted(st, o.service("a"), o.service("b", clusterIP="10.96.0.2"), o.service("c", "shop"))
    # b's address is reserved before a and c are given theirs, though it comes later in the batch
    assert ips(objs) == [("10.96.0.3", ["10.96.0.3"]), ("10.96.0.2", ["10.96.0.2"]), ("10.96.0.4", ["10.96.0.4"])]
    assert all(obj["spec"]["type"] == "ClusterIP" for obj in objs)


def test_reapplying_keeps_the_address_and_a_deleted_services_address_is_free_again() -> None:
    st = state()
    first = admitted(st, o.service("web"))[0]
    st.put(first)
    again = admitted(st, o.service("web"))[0]  # applied again without clusterIP: keeps its address
    assert again["spec"]["clusterIP"] == first["spec"]["clusterIP"] == "10.96.0.1"
    assert admitted(st, o.service("web", clusterIP="10.96.0.1"))[0]["spec"]["clusterIP"] == "10.96.0.1"
    st.remove("Service", "default", "web")
    assert admitted(st, o.service("other"))[0]["spec"]["clusterIP"] == "10.96.0.1"


def test_headless_and_external_name_services_get_no_address() -> None:
    headless, external = admitted(state(), o.service("h", clusterIP="None"),
                                  o.service("x", type="ExternalName", externalName="example.org", ports=[]))
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["clusterIPs"] == ["None"]
    assert "clusterIP" not in external["spec"]


def test_services_get_the_ipv4_family_as_the_api_server_of_an_ipv4_service_cluster_sets_it() -> None:
    """The lab's Services are IPv4 only, also in a dual-stack lab: admitted single-stack IPv4, so a selected
    dual-stack pod is their endpoint at its IPv4 address only (a headless one resolves to IPv4 addresses)."""
    plain, prefer, headless = admitted(state(), o.service("a", selector={"app": "a"}),
                                       o.service("b", selector={"app": "a"}, ipFamilyPolicy="PreferDualStack"),
                                       o.service("h", selector={"app": "a"}, clusterIP="None", ipFamilies=["IPv4"]))
    for obj in (plain, prefer, headless):
        assert (obj["spec"]["ipFamilies"], obj["spec"]["ipFamilyPolicy"]) == (["IPv4"], "SingleStack")
    dual_pod = o.pod("a-1", "10.200.0.10", app="a")
    dual_pod["status"]["podIPs"].append({"ip": "fd00:200:0::10"})
    mesh, errors = services.mesh_state([o.namespace("default"), dual_pod, plain, headless])
    assert errors == [] and mesh.by_ip("fd00:200::10") is mesh.by_ip("10.200.0.10") is not None
    assert sorted(mesh.endpoints["default/a"]) == sorted(mesh.endpoints["default/h"]) == ["10.200.0.10"]


@pytest.mark.parametrize(("spec", "error"), [
    ({"ipFamilies": ["IPv6"]}, "Service default/web: spec.ipFamilies ['IPv6']: the lab's Services are IPv4 only"),
    ({"ipFamilies": ["IPv4", "IPv6"]}, "spec.ipFamilies ['IPv4', 'IPv6']: the lab's Services are IPv4 only"),
    ({"ipFamilyPolicy": "RequireDualStack"},
     "Service default/web: spec.ipFamilyPolicy 'RequireDualStack': the lab's Services are IPv4 only"),
])
def test_an_ipv6_or_dual_stack_service_is_refused_naming_the_field(spec: dict[str, Any], error: str) -> None:
    errors = services.admit(state(), [o.service("web", **spec)])
    assert len(errors) == 1 and error in errors[0], errors


def test_the_range_is_used_up_with_a_clear_error() -> None:
    st = state()
    allocator = services._Allocator([])
    for _ in range(SERVICE_CIDR.num_addresses - 2):
        allocator.allocate("default/x", "Service default/x")
    with pytest.raises(ObjectError, match=r"Service default/y: spec.clusterIP: the service range "
                                                  r"10.96.0.0/16 is full"):
        allocator.allocate("default/y", "Service default/y")
    assert st.of_kind("Service") == []


def node_ports(obj: dict[str, Any]) -> list[int | None]:
    return [p.get("nodePort") for p in obj["spec"]["ports"]]


def nodeport(name: str, *ports: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return o.service(name, type="NodePort", ports=list(ports) or [{"port": 80, "name": "http"}], **spec)


def test_node_ports_given_kept_else_the_lowest_free_above_the_static_band() -> None:
    st = state(nodeport("old", {"port": 80, "nodePort": 30086}))
    a, b, c = admitted(st, nodeport("a", {"port": 80, "name": "http"}, {"port": 443, "name": "https"}),
                       nodeport("b", {"port": 80, "nodePort": 30087}), nodeport("c", {"port": 80, "nodePort": 30000}))
    # b's port is reserved before a gets its two, though b comes later in the batch; the static band is not used
    assert (node_ports(a), node_ports(b), node_ports(c)) == ([30088, 30089], [30087], [30000])
    assert a["spec"]["type"] == "NodePort" and a["spec"]["externalTrafficPolicy"] == "Cluster"
    assert a["spec"]["clusterIP"] == "10.96.0.1"  # a NodePort Service has a cluster IP too
    local = admitted(st, nodeport("l", externalTrafficPolicy="Local"))[0]
    assert local["spec"]["externalTrafficPolicy"] == "Local"


def test_node_ports_by_protocol_and_the_static_band_when_the_rest_is_used_up() -> None:
    pair = admitted(state(), nodeport("dns", {"port": 53, "name": "tcp", "nodePort": 30053},
                                      {"port": 53, "name": "udp", "protocol": "UDP", "nodePort": 30053}))[0]
    assert node_ports(pair) == [30053, 30053]
    ports = services._NodePorts([])
    taken = [ports.allocate("TCP", "default/x", "Service default/x", "f") for _ in range(len(services.NODE_PORTS))]
    assert taken[:2] == [30086, 30087] and taken[-86:] == list(range(30000, 30086))
    assert ports.allocate("UDP", "default/x", "Service default/x", "f") == 30086
    with pytest.raises(ObjectError, match=r"Service default/y: spec.ports\[0\].nodePort: the node port range "
                                          r"30000-32767 is full"):
        ports.allocate("TCP", "default/y", "Service default/y", "spec.ports[0].nodePort")


def test_reapplying_keeps_each_ports_node_port_by_name() -> None:
    st = state()
    first = admitted(st, nodeport("web", {"port": 80, "name": "http"}, {"port": 443, "name": "https"}))[0]
    st.put(first)
    again = admitted(st, nodeport("web", {"port": 443, "name": "https"}, {"port": 8080, "name": "http"},
                                  {"port": 9000, "name": "admin"}))[0]
    assert node_ports(first) == [30086, 30087] and node_ports(again) == [30087, 30086, 30088]
    # a port asking for its namesake's old number elsewhere: the namesake gets a new one, no duplicate
    moved = admitted(st, nodeport("web", {"port": 80, "name": "http"}, {"port": 81, "name": "x", "nodePort": 30086}))
    assert node_ports(moved[0]) == [30087, 30086]  # its old https port is free in this batch
    # a batch that frees a node port and gives it to another Service
    swapped = admitted(st, nodeport("web", {"port": 80, "name": "http", "nodePort": 30090}),
                       nodeport("other", {"port": 80, "nodePort": 30086}))
    assert [node_ports(x) for x in swapped] == [[30090], [30086]]


def test_load_balancers_get_node_ports_unless_told_not_to() -> None:
    lb, bare = admitted(state(), o.service("lb", type="LoadBalancer"),
                        o.service("bare", type="LoadBalancer", allocateLoadBalancerNodePorts=False))
    assert node_ports(lb) == [30086] and node_ports(bare) == [None]
    assert lb["spec"]["externalTrafficPolicy"] == "Cluster"


@pytest.mark.parametrize(("batch", "existing", "error"), [
    ([o.service("web", clusterIP="10.97.0.1")], [],
     "Service default/web: spec.clusterIP 10.97.0.1 is not in the service range 10.96.0.0/16"),
    ([o.service("web", clusterIP="10.96.0.0")], [],
     "Service default/web: spec.clusterIP 10.96.0.0 is not in the service range 10.96.0.0/16"),
    ([o.service("web", clusterIP="banana")], [], "Service default/web: spec.clusterIP 'banana' is not an IP address"),
    ([o.service("web", clusterIP=7)], [], "Service default/web: spec.clusterIP must be a string, not int"),
    ([o.service("web", clusterIPs=["10.96.0.9", "fd00::9"])], [],
     "Service default/web: spec.clusterIPs: the lab is IPv4 only (one cluster IP), not ['10.96.0.9', 'fd00::9']"),
    ([o.service("web", clusterIP="10.96.0.9", clusterIPs=["10.96.0.8"])], [],
     "Service default/web: spec.clusterIPs[0] '10.96.0.8' must equal spec.clusterIP '10.96.0.9'"),
    ([o.service("web", clusterIP="10.96.0.5")], [o.service("db", "shop", clusterIP="10.96.0.5")],
     "Service default/web: spec.clusterIP 10.96.0.5 is already allocated to Service shop/db"),
    ([o.service("a", clusterIP="10.96.0.5"), o.service("b", clusterIP="10.96.0.5")], [],
     "Service default/b: spec.clusterIP 10.96.0.5 is already allocated to Service default/a"),
    ([o.service("web", clusterIP="10.96.0.6")], [o.service("web", clusterIP="10.96.0.5")],
     "Service default/web: spec.clusterIP: field is immutable (10.96.0.5, not 10.96.0.6)"),
    ([o.service("web", type="ExternalIP")], [],
     "Service default/web: spec.type 'ExternalIP': the lab has ClusterIP, NodePort, LoadBalancer, ExternalName "
     "Services only"),
    ([nodeport("web", {"port": 80, "nodePort": 30080})], [nodeport("db", {"port": 5432, "nodePort": 30080})],
     "Service default/web: spec.ports[0].nodePort 30080 is already allocated to Service default/db"),
    ([nodeport("a", {"port": 80, "nodePort": 30080}), nodeport("b", {"port": 80, "nodePort": 30080})], [],
     "Service default/b: spec.ports[0].nodePort 30080 is already allocated to Service default/a"),
    ([nodeport("web", {"port": 80, "nodePort": 30080}, {"port": 81, "nodePort": 30080})], [],
     "Service default/web: spec.ports[1].nodePort 30080 is given to another port of the Service"),
    ([nodeport("web", {"port": 80, "nodePort": 8080})], [],
     "Service default/web: spec.ports[0].nodePort 8080 is not in the node port range 30000-32767"),
    ([nodeport("web", {"port": 80, "nodePort": "30080"})], [],
     "Service default/web: spec.ports[0].nodePort '30080' is not in the node port range 30000-32767"),
    ([o.service("web", ports=[{"port": 80, "nodePort": 30080}])], [],
     "Service default/web: spec.ports[0].nodePort may not be used when spec.type is ClusterIP"),
    ([nodeport("web", clusterIP="None")], [],
     "Service default/web: spec.clusterIP: may not be None for NodePort Services"),
    ([o.service("web", externalTrafficPolicy="Local")], [],
     "Service default/web: spec.externalTrafficPolicy may only be set for NodePort and LoadBalancer Services"),
    ([nodeport("web", externalTrafficPolicy="Nearby")], [],
     "Service default/web: spec.externalTrafficPolicy must be Cluster or Local, not 'Nearby'"),
    ([o.service("web", type="LoadBalancer", allocateLoadBalancerNodePorts="no")], [],
     "Service default/web: spec.allocateLoadBalancerNodePorts must be true or false"),
    ([o.service("web", ports=[{"port": 0}])], [],
     "Service default/web: spec.ports[0].port must be a port number 1-65535, not 0"),
    ([o.service("web", ports=[{"port": 80, "targetPort": ""}])], [],
     "Service default/web: spec.ports[0].targetPort must not be empty"),
    ([o.service("web", selector={"app": True})], [], "Service default/web: spec.selector must map strings to strings"),
    ([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"}, "spec": [1]}], [],
     "Service default/web: spec must be a mapping, not list"),
    ([o.endpoint_slice("web-1", "web", [("10.200.0.300", "node-1")], 8080)], [],
     "EndpointSlice default/web-1: endpoints[0].addresses[0] '10.200.0.300' is not an IP address"),
    ([o.endpoint_slice("web-1", "web", [("10.200.0.3", "node-1")], 99999)], [],
     "EndpointSlice default/web-1: ports[0].port must be a port number 1-65535, not 99999"),
])
def test_a_bad_object_is_refused_naming_object_and_field(batch: list[dict[str, Any]],
                                                         existing: list[dict[str, Any]], error: str) -> None:
    st = state(*existing)
    before = st.dump()
    good = o.service("fine")
    errors = services.admit(st, [copy.deepcopy(good), *copy.deepcopy(batch)])
    assert errors == [error]
    assert st.dump() == before  # admit only looks at the state


def test_every_bad_object_of_a_batch_is_named() -> None:
    errors = services.admit(state(), [o.service("a", ports=[{"port": 0}]), o.service("b", clusterIP="1.2.3.4"),
                                      o.service("c")])
    assert errors == ["Service default/b: spec.clusterIP 1.2.3.4 is not in the service range 10.96.0.0/16",
                      "Service default/a: spec.ports[0].port must be a port number 1-65535, not 0"]


def test_the_mesh_view_leaves_out_what_the_agents_refuse_and_keeps_the_rest() -> None:
    """A Service that reached the state without the API server's checks: left out, the others computed."""
    bad = o.service("bad", ports=[{"port": "eighty"}])
    mesh, errors = services.mesh_state(state(
        o.pod("a", "10.200.0.10", app="web"), o.service("web", selector={"app": "web"}, clusterIP="10.96.0.1"),
        bad).objects)
    assert [str(e) for e in errors] == ["Service default/bad: spec.ports[0].port must be a port number 1-65535, "
                                        "not 'eighty'"]
    assert sorted(mesh.services) == ["default/web"]
    assert list(mesh.endpoints["default/web"]) == ["10.200.0.10"]
