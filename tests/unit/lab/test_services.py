"""What the lab's API server does with Services: cluster IPs (kept, allocated, refused) and the validation of
Services and EndpointSlices, each error naming the object and the field; and the mesh view made from a state
holding an object the agents would refuse."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from agent.lab import service_ips, services
from agent.lab.state import LabObjects
from agent.lab.topology import SERVICE_CIDR
from agent.mesh.convert import ObjectError
from tests.unit.lab import objects as o


def state(*objs: dict[str, Any]) -> LabObjects:
    return LabObjects([o.namespace("default"), o.namespace("shop"), *objs])


def admitted(st: LabObjects, *batch: dict[str, Any], dual_stack: bool = False) -> list[dict[str, Any]]:
    """The batch as admit() completes it (in an IPv4-only lab, or a dual-stack one); fails on any error."""
    objs = [copy.deepcopy(b) for b in batch]
    assert services.admit(st, objs, dual_stack=dual_stack) == []
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


def families(obj: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    spec = obj["spec"]
    return spec["ipFamilyPolicy"], spec["ipFamilies"], spec["clusterIPs"]


def test_an_ipv4_only_lab_gives_ipv4_single_stack_and_prefer_dual_stack_falls_back() -> None:
    plain, prefer, headless = admitted(state(), o.service("a", selector={"app": "a"}),
                                       o.service("b", selector={"app": "a"}, ipFamilyPolicy="PreferDualStack"),
                                       o.service("h", selector={"app": "a"}, clusterIP="None", ipFamilies=["IPv4"]))
    assert families(plain) == ("SingleStack", ["IPv4"], ["10.96.0.1"])
    assert families(prefer) == ("PreferDualStack", ["IPv4"], ["10.96.0.2"])
    assert families(headless) == ("SingleStack", ["IPv4"], ["None"])
    assert plain["spec"]["clusterIP"] == "10.96.0.1"


def test_a_dual_stack_lab_gives_what_each_policy_asks_for() -> None:
    """As kube-apiserver with --service-cluster-ip-range=10.96.0.0/16,fd00:96::/112: IPv4 single stack by
    default, both families (in the order asked, IPv4 first by default) for PreferDualStack and
    RequireDualStack, IPv6 alone when asked; a headless Service without selector is RequireDualStack."""
    objs = admitted(state(), o.service("plain"), o.service("prefer", ipFamilyPolicy="PreferDualStack"),
                    o.service("v6first", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv6"]),
                    o.service("v6", ipFamilies=["IPv6"]),
                    o.service("given", ipFamilyPolicy="RequireDualStack", clusterIPs=["10.96.9.9", "fd00:96::99"]),
                    o.service("h", clusterIP="None", ports=[]),
                    o.service("h4", clusterIP="None", selector={"app": "a"}, ipFamilies=["IPv4"]),
                    dual_stack=True)
    assert [families(obj) for obj in objs] == [
        ("SingleStack", ["IPv4"], ["10.96.0.1"]),
        ("PreferDualStack", ["IPv4", "IPv6"], ["10.96.0.2", "fd00:96::1"]),
        ("RequireDualStack", ["IPv6", "IPv4"], ["fd00:96::2", "10.96.0.3"]),
        ("SingleStack", ["IPv6"], ["fd00:96::3"]),
        ("RequireDualStack", ["IPv4", "IPv6"], ["10.96.9.9", "fd00:96::99"]),
        ("RequireDualStack", ["IPv4", "IPv6"], ["None"]),
        ("SingleStack", ["IPv4"], ["None"])]
    assert objs[2]["spec"]["clusterIP"] == "fd00:96::2"  # the first family's address


def test_updates_keep_both_addresses_release_the_second_and_never_change_the_first() -> None:
    st = state()
    first = admitted(st, o.service("web", ipFamilyPolicy="PreferDualStack"), dual_stack=True)[0]
    st.put(first)
    again = admitted(st, o.service("web"), dual_stack=True)[0]  # no policy: the one it had
    assert families(again) == families(first) == ("PreferDualStack", ["IPv4", "IPv6"], ["10.96.0.1", "fd00:96::1"])
    single = copy.deepcopy(first)
    single["spec"]["ipFamilyPolicy"] = "SingleStack"  # the completed object, told to be single-stack
    released = admitted(st, single, dual_stack=True)[0]
    assert families(released) == ("SingleStack", ["IPv4"], ["10.96.0.1"])
    st.put(released)
    assert families(admitted(st, o.service("other", ipFamilies=["IPv6"]), dual_stack=True)[0])[2] == ["fd00:96::1"]
    upgraded = admitted(st, o.service("web", ipFamilyPolicy="RequireDualStack"), dual_stack=True)[0]
    assert families(upgraded) == ("RequireDualStack", ["IPv4", "IPv6"], ["10.96.0.1", "fd00:96::1"])
    st.put(upgraded)
    assert services.admit(st, [o.service("web", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv6", "IPv4"])],
                          dual_stack=True) == ["Service default/web: spec.ipFamilies[0]: field is immutable (IPv4, "
                                               "not IPv6)"]
    assert services.admit(st, [o.service("web", clusterIPs=["10.96.0.1", "fd00:96::7"])], dual_stack=True) == [
        "Service default/web: spec.clusterIPs[1]: may not change once set (fd00:96::1, not fd00:96::7)"]
    assert services.admit(st, [o.service("web", clusterIPs=["10.96.0.1"])], dual_stack=True) == [
        "Service default/web: spec.ipFamilyPolicy RequireDualStack: must be SingleStack to release the second "
        "cluster IP"]


def test_a_dual_stack_service_has_the_pods_addresses_of_its_families_as_endpoints() -> None:
    dual_pod = o.pod("a-1", "10.200.0.10", app="a")
    dual_pod["status"]["podIPs"].append({"ip": "fd00:200:0::10"})
    objs = admitted(state(dual_pod), o.service("v4", selector={"app": "a"}),
                    o.service("both", selector={"app": "a"}, ipFamilyPolicy="RequireDualStack"),
                    o.service("v6", selector={"app": "a"}, ipFamilies=["IPv6"]), dual_stack=True)
    mesh, errors = services.mesh_state([o.namespace("default"), dual_pod, *objs])
    assert errors == []
    assert {key: sorted(eps) for key, eps in mesh.endpoints.items()} == {
        "default/v4": ["10.200.0.10"], "default/both": ["10.200.0.10", "fd00:200::10"],
        "default/v6": ["fd00:200::10"]}
    assert mesh.services["default/both"].vips == ("10.96.0.2", "fd00:96::1")


@pytest.mark.parametrize(("spec", "dual_stack", "error"), [
    ({"ipFamilies": ["IPv6"]}, False,
     "Service default/web: spec.ipFamilies[0] IPv6 is not configured in this lab (IPv4 only; ambit lab up "
     "--dual-stack has IPv6 too)"),
    ({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}, False,
     "Service default/web: spec.ipFamilies[1] IPv6 is not configured in this lab"),
    ({"ipFamilyPolicy": "RequireDualStack"}, False,
     "Service default/web: spec.ipFamilyPolicy RequireDualStack: the lab is not dual-stack (ambit lab up "
     "--dual-stack)"),
    ({"ipFamilies": ["IPv4", "IPv6"]}, True,
     "Service default/web: spec.ipFamilyPolicy SingleStack: must be RequireDualStack or PreferDualStack when two "
     "IP families are given"),
    ({"clusterIPs": ["10.96.0.9", "fd00:96::9"]}, True,
     "Service default/web: spec.ipFamilyPolicy SingleStack: must be RequireDualStack or PreferDualStack when two "
     "cluster IPs are given"),
    ({"ipFamilyPolicy": "DualStack"}, True,
     "Service default/web: spec.ipFamilyPolicy must be SingleStack, PreferDualStack, RequireDualStack, not "
     "'DualStack'"),
    ({"ipFamilies": ["IPv6", "IPv6"]}, True,
     "Service default/web: spec.ipFamilies[1] must be IPv4 or IPv6, each once, not 'IPv6'"),
    ({"ipFamilies": "IPv6"}, True, "Service default/web: spec.ipFamilies must be a list, not str"),
    ({"clusterIPs": ["10.96.0.9", "10.96.0.10"], "ipFamilyPolicy": "PreferDualStack"}, True,
     "Service default/web: spec.clusterIPs[1] 10.96.0.10 is of the family of spec.clusterIPs[0]: a Service has "
     "one cluster IP of each family"),
    ({"clusterIPs": ["fd00:96::9"], "ipFamilies": ["IPv4"]}, True,
     "Service default/web: spec.clusterIPs[0] fd00:96::9 is not of spec.ipFamilies[0] IPv4"),
    ({"clusterIPs": ["10.96.0.9", "fd00:97::9"], "ipFamilyPolicy": "RequireDualStack"}, True,
     "Service default/web: spec.clusterIPs[1] fd00:97::9 is not in the service range fd00:96::/112"),
    ({"clusterIP": "fd00:96::"}, True,
     "Service default/web: spec.clusterIP fd00:96:: is not in the service range fd00:96::/112"),
    ({"clusterIPs": ["None", "fd00:96::9"]}, True,
     "Service default/web: spec.clusterIPs: None must be the only entry, not ['None', 'fd00:96::9']"),
    ({"clusterIPs": ["10.96.0.1", "fd00:96::1", "10.96.0.2"]}, True,
     "Service default/web: spec.clusterIPs holds at most two addresses (one per family), not "),
])
def test_a_family_the_lab_lacks_or_a_bad_family_field_is_refused_naming_the_field(
        spec: dict[str, Any], dual_stack: bool, error: str) -> None:
    errors = services.admit(state(), [o.service("web", **spec)], dual_stack=dual_stack)
    assert len(errors) == 1 and error in errors[0], errors


def test_the_range_is_used_up_with_a_clear_error() -> None:
    for family, network in service_ips.ranges(dual_stack=True).items():
        allocator = service_ips.Allocator([], {family: network})
        allocator._hosts[family] = itertools.islice(allocator._hosts[family], 3)  # a short range, same code
        taken = [allocator.allocate(family, "default/x", "Service default/x", "spec.clusterIP") for _ in range(3)]
        assert taken == [str(network.network_address + i) for i in (1, 2, 3)]
        with pytest.raises(ObjectError, match=rf"Service default/y: spec.clusterIPs\[1\]: the service range "
                                              rf"{network} is full"):
            allocator.allocate(family, "default/y", "Service default/y", "spec.clusterIPs[1]")
    v4 = service_ips.Allocator([], service_ips.ranges(dual_stack=False))
    assert len([v4.allocate(4, "default/x", "Service default/x", "f") for _ in range(SERVICE_CIDR.num_addresses - 2)]
               ) == 65534
    with pytest.raises(ObjectError, match=r"Service default/y: spec.clusterIP: the service range 10.96.0.0/16 is full"):
        v4.allocate(4, "default/y", "Service default/y", "spec.clusterIP")


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
    ([o.service("web", clusterIPs=["10.96.0.9", "fd00::9"], ipFamilyPolicy="PreferDualStack")], [],
     "Service default/web: spec.clusterIPs[1] fd00::9: IPv6 is not configured in this lab (IPv4 only; ambit lab "
     "up --dual-stack has IPv6 too)"),
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


def test_status_lists_the_endpoints_of_both_families_ipv4_first() -> None:
    endpoints = [{"ip": ip, "ports": {"80": 8080}} for ip in ("fd00:200::10", "10.200.1.10", "10.200.0.9",
                                                               "fd00:200:1::10")]
    assert services.endpoints_text(endpoints) == ("10.200.0.9:8080, 10.200.1.10:8080, [fd00:200::10]:8080, "
                                                  "[fd00:200:1::10]:8080")
