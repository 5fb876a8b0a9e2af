"""Kubernetes objects to the mesh's typed values (agent.mesh.convert), as istiod maps them for ambient."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from agent.mesh import convert
from agent.mesh.convert import ObjectError
from agent.mesh.model import Node, Preference, ServicePort, SliceEndpoints
from tests.fixtures.mesh_objects import AMBIENT, endpoint_slice, namespace, node, pod, service

SIDECAR = {"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}


# -- identity of any object ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("obj", "message"), [
    (["kind", "Pod"], "every item must be a Kubernetes object (a mapping), not list"),
    ({"metadata": {"name": "a"}}, "an object without a kind: kind must be a non-empty string, not None"),
    ({"kind": "", "metadata": {"name": "a"}}, "kind must be a non-empty string, not ''"),
    ({"kind": 7, "metadata": {"name": "a"}}, "kind must be a non-empty string, not 7"),
    ({"kind": "Pod", "metadata": ["name", "a"]}, "Pod: metadata must be a mapping, not list"),
    ({"kind": "Pod", "metadata": "a"}, "Pod: metadata must be a mapping, not str"),
    ({"kind": "Service"}, "Service: metadata.name must be a non-empty string, not None"),
    ({"kind": "Pod", "metadata": {"name": 42}}, "Pod: metadata.name must be a non-empty string, not 42"),
    ({"kind": "Node", "metadata": {"name": ""}}, "Node: metadata.name must be a non-empty string, not ''"),
    ({"kind": "Pod", "metadata": {"name": "a", "namespace": False}},
     "Pod a: metadata.namespace must be a non-empty string, not False"),
    ({"kind": "Pod", "metadata": {"name": "a", "namespace": ""}},
     "Pod a: metadata.namespace must be a non-empty string, not ''"),
    ({"kind": "Service", "metadata": {"name": "a", "namespace": None}},
     "Service a: metadata.namespace must be a non-empty string, not None"),
    ({"kind": "AuthorizationPolicy", "metadata": {"name": "a", "namespace": 3}},
     "AuthorizationPolicy a: metadata.namespace must be a non-empty string, not 3"),
])
def test_identify_rejects_malformed_objects_naming_the_field(obj: Any, message: str) -> None:
    with pytest.raises(ObjectError) as raised:
        convert.identify(obj)
    assert message in str(raised.value)


def test_yaml_no_as_a_namespace_is_rejected_not_read_as_a_name() -> None:
    obj = yaml.safe_load("kind: Pod\nmetadata: {name: a, namespace: no}\n")
    assert obj["metadata"]["namespace"] is False  # what YAML 1.1 makes of `no`
    with pytest.raises(ObjectError, match=re.escape("Pod a: metadata.namespace must be a non-empty string, not False")):
        convert.identify(obj)


def test_identify_keys() -> None:
    assert convert.identify(pod("a", "shop")) == ("Pod", "shop", "a")
    assert convert.identify({"kind": "Pod", "metadata": {"name": "a"}}) == ("Pod", "default", "a")
    assert convert.identify(namespace("shop")) == ("Namespace", "", "shop")
    assert convert.identify({**node("n1"), "metadata": {"name": "n1", "namespace": "x"}}) == ("Node", "", "n1")


# -- enrollment -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("pod_labels", "ns_labels", "extra", "enrolled"), [
    ({}, AMBIENT, {}, True),                                            # the namespace enrolls
    ({}, {}, {}, False),                                                # nothing asks for it
    ({}, {"istio.io/dataplane-mode": "sidecar"}, {}, False),            # another namespace value
    (AMBIENT, {}, {}, True),                                            # the pod's own label
    ({"istio.io/dataplane-mode": "none"}, AMBIENT, {}, False),          # pod opt-out wins
    ({"istio.io/dataplane-mode": "bogus"}, AMBIENT, {}, True),          # other pod values defer to the namespace
    ({"istio.io/dataplane-mode": "bogus"}, {}, {}, False),
    (AMBIENT, AMBIENT, {"annotations": SIDECAR}, False),                # injected sidecar
    (AMBIENT, AMBIENT, {"sidecar": True}, False),                       # istio-proxy container
    (AMBIENT, AMBIENT, {"hostNetwork": True}, False),                   # the node's own addresses
])
def test_enrollment_rules(pod_labels: dict[str, str], ns_labels: dict[str, str], extra: dict[str, Any],
                          enrolled: bool) -> None:
    obj = pod("a", labels=pod_labels, annotations=extra.get("annotations"))
    if extra.get("hostNetwork"):
        obj["spec"]["hostNetwork"] = True
    if extra.get("sidecar"):
        obj["spec"]["containers"].append({"name": "istio-proxy", "image": "proxyv2"})
    assert convert.enrolled(obj, ns_labels) is enrolled
    workload = convert.pod_workload(obj, ns_labels)
    if extra.get("hostNetwork"):
        assert workload is None  # not a workload at all: it has no address of its own
    else:
        assert workload is not None and workload.enrolled is enrolled


# -- pods -------------------------------------------------------------------------------------------------------
def test_pod_workload_fields() -> None:
    obj = pod("web-1", "shop", "10.0.0.5", node="n2", labels={"app": "web"}, ports={"http": 8080, "admin": 9000},
              ips=["fd00::05", "10.0.0.5"], uid="u-1", created="2026-03-04T05:06:07Z")
    obj["spec"]["containers"].append({"name": "side", "ports": [
        {"name": "http", "containerPort": 1111},                    # the first container's name wins
        {"name": "dns", "containerPort": 53, "protocol": "UDP"},    # not TCP: not a target
        {"containerPort": 7000}]})                                   # unnamed: nothing to resolve by name
    w = convert.pod_workload(obj, {})
    assert w is not None
    assert (w.namespace, w.name, w.uid, w.node, w.service_account) == ("shop", "web-1", "u-1", "n2", "sa")
    assert w.ips == ("10.0.0.5", "fd00::5")  # primary first, normalised, no duplicate
    assert w.ip == "10.0.0.5" and w.key == "shop/web-1" and w.created == "2026-03-04T05:06:07Z"
    assert dict(w.ports) == {"http": 8080, "admin": 9000}
    assert dict(w.labels) == {"app": "web"} and w.ready and not w.enrolled
    assert str(w.identity("cluster.local")) == "spiffe://cluster.local/ns/shop/sa/sa"


def test_pod_defaults_for_uid_and_service_account() -> None:
    obj = pod("a", "shop")
    del obj["metadata"]["uid"], obj["spec"]["serviceAccountName"]
    w = convert.pod_workload(obj, {})
    assert w is not None and (w.uid, w.service_account) == ("shop/a", "default")
    obj["spec"]["serviceAccount"] = "legacy"
    w = convert.pod_workload(obj, {})
    assert w is not None and w.service_account == "legacy"


@pytest.mark.parametrize(("overrides", "ready"), [
    ({}, True),
    ({"ready": False}, False),
    ({"ready": None}, True),       # no conditions at all (the lab's pods): running means ready
    ({"deleting": True}, False),   # terminating pods are not healthy endpoints
])
def test_pod_health(overrides: dict[str, Any], ready: bool) -> None:
    w = convert.pod_workload(pod("a", **overrides), {})
    assert w is not None and w.ready is ready


@pytest.mark.parametrize("obj", [
    pod("pending", phase="Pending"),
    pod("succeeded", phase="Succeeded"),
    pod("no-ip", ip=None),
    pod("unscheduled", node=""),
    pod("host", hostNetwork=True),
], ids=lambda o: o["metadata"]["name"])
def test_pods_without_an_address_of_their_own_are_not_workloads(obj: dict[str, Any]) -> None:
    assert convert.pod_workload(obj, AMBIENT) is None


def _broken(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (a pod by default) with the field at dotted ``path`` set to ``value``."""
    obj: dict[str, Any] = yaml.safe_load(yaml.safe_dump(base if base is not None else pod("a", "shop")))
    *parents, last = path.split(".")
    at: Any = obj
    for part in parents:
        at = at[int(part)] if isinstance(at, list) else at[part]
    if isinstance(at, list):
        at[int(last)] = value
    else:
        at[last] = value
    return obj


@pytest.mark.parametrize(("path", "value", "message"), [
    ("metadata.labels", {"app": 1}, "Pod shop/a: metadata.labels must map strings to strings"),
    ("metadata.labels", ["app"], "Pod shop/a: metadata.labels must be a mapping, not list"),
    ("metadata.annotations", {"a": None}, "Pod shop/a: metadata.annotations must map strings to strings"),
    ("metadata.uid", 12, "Pod shop/a: metadata.uid must be a string, not int"),
    ("spec", "x", "Pod shop/a: spec must be a mapping, not str"),
    ("status", [], "Pod shop/a: status must be a mapping, not list"),
    ("spec.nodeName", 3, "Pod shop/a: spec.nodeName must be a string, not int"),
    ("spec.serviceAccountName", 3, "Pod shop/a: spec.serviceAccountName must be a string, not int"),
    ("status.phase", True, "Pod shop/a: status.phase must be a string, not bool"),
    ("status.podIP", "10.0.0.300", "Pod shop/a: status.podIP '10.0.0.300' is not an IP address"),
    ("status.podIP", 167772161, "Pod shop/a: status.podIP must be a string, not int"),
    ("status.podIPs", "10.0.0.1", "Pod shop/a: status.podIPs must be a list, not str"),
    ("status.podIPs.0", "10.0.0.1", "Pod shop/a: status.podIPs[0] must be a mapping, not str"),
    ("status.podIPs.0.ip", "pod", "Pod shop/a: status.podIPs[0].ip 'pod' is not an IP address"),
    ("status.conditions", {"Ready": True}, "Pod shop/a: status.conditions must be a list, not dict"),
    ("status.conditions.1", "Ready", "Pod shop/a: status.conditions[1] must be a mapping, not str"),
    ("spec.containers", {"app": {}}, "Pod shop/a: spec.containers must be a list, not dict"),
    ("spec.containers.0", "app", "Pod shop/a: spec.containers[0] must be a mapping, not str"),
    ("spec.containers.0.ports", [{"name": "http", "containerPort": 0}],
     "Pod shop/a: spec.containers[0].ports[0].containerPort must be a port number 1-65535, not 0"),
    ("spec.containers.0.ports", [{"name": "http", "containerPort": "80"}],
     "spec.containers[0].ports[0].containerPort must be a port number 1-65535, not '80'"),
    ("spec.containers.0.ports", [{"name": "http", "containerPort": True}],
     "spec.containers[0].ports[0].containerPort must be a port number 1-65535, not True"),
    ("spec.containers.0.ports", [{"name": 8, "containerPort": 80}],
     "spec.containers[0].ports[0].name must be a string, not int"),
    ("spec.containers.0.ports", ["http"], "spec.containers[0].ports[0] must be a mapping, not str"),
])
def test_malformed_pods_are_rejected_naming_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(ObjectError) as raised:
        convert.pod_workload(_broken(path, value), {})
    assert message in str(raised.value)


def test_a_malformed_pod_is_rejected_even_when_it_would_not_be_a_workload() -> None:
    obj = _broken("metadata.labels", {"app": 1}, pod("a", "shop", phase="Pending"))
    with pytest.raises(ObjectError, match=re.escape("metadata.labels")):
        convert.pod_workload(obj, {})


# -- services ---------------------------------------------------------------------------------------------------
def _service(obj: dict[str, Any], ns_annotations: dict[str, str] | None = None) -> Any:
    svc = convert.service(obj, ns_annotations)
    assert svc is not None
    return svc


@pytest.mark.parametrize(("spec", "vips"), [
    ({"clusterIPs": ["10.96.0.1", "fd00:96::1"]}, ("10.96.0.1", "fd00:96::1")),
    ({"clusterIP": "10.96.0.2"}, ("10.96.0.2",)),                                # clusterIPs absent
    ({"clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.3"]}, ("10.96.0.3",)),   # clusterIPs first
    ({"clusterIP": "None", "clusterIPs": ["None"]}, ()),                          # headless
    ({"clusterIP": ""}, ()),                                                      # not allocated yet
    ({"clusterIPs": ["", "10.96.0.4", "None"]}, ("10.96.0.4",)),
    ({"clusterIP": "10.96.0.5", "externalIPs": ["192.0.2.1"], "type": "LoadBalancer"}, ("10.96.0.5",)),
])
def test_vips_are_the_cluster_ips(spec: dict[str, Any], vips: tuple[str, ...]) -> None:
    obj = service("web", "shop", None, selector={"app": "web"}, **spec)
    svc = _service(obj)
    assert svc.vips == vips
    assert svc.hostname == "web.shop.svc.cluster.local" and svc.key == "shop/web"


@pytest.mark.parametrize(("spec", "families"), [
    ({"clusterIPs": ["10.96.0.1", "fd00:96::1"], "ipFamilies": ["IPv4", "IPv6"]}, {4, 6}),
    ({"clusterIPs": ["fd00:96::1", "10.96.0.1"], "ipFamilies": ["IPv6", "IPv4"]}, {4, 6}),  # IPv6 primary
    ({"clusterIPs": ["10.96.0.1"], "ipFamilies": ["IPv4"]}, {4}),
    ({"clusterIPs": ["fd00:96::1"], "ipFamilies": ["IPv6"]}, {6}),
    ({"clusterIPs": ["10.96.0.1"]}, {4}),                                       # no ipFamilies: the VIPs'
    ({"clusterIPs": ["10.96.0.1", "fd00:96::1"]}, {4, 6}),
    ({"clusterIP": "None", "ipFamilies": ["IPv6"]}, {6}),                       # headless, one family
    ({"clusterIP": "None"}, {4, 6}),                                            # headless, no families: both
])
def test_service_ip_families(spec: dict[str, Any], families: set[int]) -> None:
    assert _service(service("web", "shop", None, selector={"app": "web"}, **spec)).families == families


def test_external_name_services_are_not_in_the_mesh() -> None:
    obj = service("ext", "shop", None, type="ExternalName", externalName="example.com")
    assert convert.service(obj) is None


def test_service_ports() -> None:
    obj = service("web", "shop", selector={"app": "web"}, ports=[
        {"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},   # named: per pod
        {"name": "grpc", "port": 9090, "targetPort": 19090},
        {"name": "text", "port": 8443, "targetPort": "8444"},                       # digits: a number
        {"name": "plain", "port": 7000},                                            # default: the port
        {"name": "dns", "port": 53, "protocol": "UDP"},                             # not TCP: ignored
        {"name": "sctp", "port": 54, "protocol": "SCTP"},
    ])
    assert _service(obj).ports == (
        ServicePort(80, 0, "http", "http", "http"), ServicePort(9090, 19090, "", "", "grpc"),
        ServicePort(8443, 8444, "", "", "text"), ServicePort(7000, 7000, "", "", "plain"))
    assert _service(obj).port(9090) == ServicePort(9090, 19090, "", "", "grpc")
    assert _service(obj).port(53) is None


def test_node_ports_and_external_traffic_policy() -> None:
    obj = service("web", "shop", selector={"app": "web"}, type="NodePort", externalTrafficPolicy="Local", ports=[
        {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
        {"name": "admin", "port": 9000, "nodePort": 0},                              # 0: none (not allocated)
        {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}])
    svc = _service(obj)
    assert [(p.port, p.node_port) for p in svc.ports] == [(80, 30080), (9000, 0)]
    assert svc.external_local
    assert not _service(service("web", type="NodePort", externalTrafficPolicy="Cluster")).external_local
    assert not _service(service("web", externalTrafficPolicy="")).external_local      # unset: Cluster
    assert _service(service("web")).ports[0].node_port == 0


def test_selector_and_publish_not_ready() -> None:
    assert _service(service("a", selector={"app": "a"})).selector == {"app": "a"}
    assert _service(service("a")).selector is None          # no selector: endpoints from EndpointSlices
    assert _service(service("a", selector={})).selector is None
    assert not _service(service("a")).publish_not_ready
    assert _service(service("a", publishNotReadyAddresses=True)).publish_not_ready


TD = "networking.istio.io/traffic-distribution"


@pytest.mark.parametrize(("spec", "annotations", "ns_annotations", "preference"), [
    ({}, {}, {}, Preference.NONE),
    ({"internalTrafficPolicy": "Cluster"}, {}, {}, Preference.NONE),
    ({"internalTrafficPolicy": "Local"}, {}, {}, Preference.NODE_ONLY),
    ({"internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose"}, {}, {}, Preference.NODE_ONLY),
    ({"trafficDistribution": "PreferClose"}, {}, {}, Preference.SAME_ZONE),
    ({"trafficDistribution": "PreferSameZone"}, {}, {}, Preference.SAME_ZONE),
    ({"trafficDistribution": "PreferSameNode"}, {}, {}, Preference.SAME_NODE),
    ({}, {TD: "PreferSameNode"}, {}, Preference.SAME_NODE),                       # the Service's annotation
    ({}, {}, {TD: "PreferClose"}, Preference.SAME_ZONE),                          # the Namespace's
    ({}, {TD: "PreferSameNode"}, {TD: "PreferClose"}, Preference.SAME_NODE),      # Service over Namespace
    ({"trafficDistribution": "PreferClose"}, {TD: "PreferSameNode"}, {}, Preference.SAME_ZONE),  # spec first
    ({"trafficDistribution": "Bogus"}, {}, {}, Preference.NONE),
])
def test_preference_as_istiod_derives_it(spec: dict[str, Any], annotations: dict[str, str],
                                         ns_annotations: dict[str, str], preference: Preference) -> None:
    obj = service("web", "shop", selector={"app": "web"}, annotations=annotations, **spec)
    assert _service(obj, ns_annotations).preference is preference


@pytest.mark.parametrize(("path", "value", "message"), [
    ("spec", [], "Service shop/web: spec must be a mapping, not list"),
    ("spec.clusterIPs", "10.96.0.1", "Service shop/web: spec.clusterIPs must be a list, not str"),
    ("spec.clusterIPs", ["10.96.0.999"], "Service shop/web: spec.clusterIPs '10.96.0.999' is not an IP address"),
    ("spec.clusterIPs", [7], "Service shop/web: spec.clusterIPs must be a string, not int"),
    ("spec.selector", {"app": 1}, "Service shop/web: spec.selector must map strings to strings"),
    ("spec.ports", {"port": 80}, "Service shop/web: spec.ports must be a list, not dict"),
    ("spec.ports", [80], "Service shop/web: spec.ports[0] must be a mapping, not int"),
    ("spec.ports", [{"port": "80"}], "Service shop/web: spec.ports[0].port must be a port number 1-65535, not '80'"),
    ("spec.ports", [{"port": 70000}], "spec.ports[0].port must be a port number 1-65535, not 70000"),
    ("spec.ports", [{"port": 80, "targetPort": ""}], "Service shop/web: spec.ports[0].targetPort must not be empty"),
    ("spec.ports", [{"port": 80, "targetPort": 0}], "spec.ports[0].targetPort must be a port number 1-65535, not 0"),
    ("spec.ports", [{"port": 80, "targetPort": "99999"}], "spec.ports[0].targetPort must be a port number"),
    ("spec.ports", [{"port": 80, "targetPort": 1.5}], "spec.ports[0].targetPort must be a port number"),
    ("spec.ports", [{"port": 80, "protocol": 6}], "spec.ports[0].protocol must be a string, not int"),
    ("spec.ports", [{"port": 80, "appProtocol": 2}], "spec.ports[0].appProtocol must be a string, not int"),
    ("spec.publishNotReadyAddresses", "yes", "spec.publishNotReadyAddresses must be true or false"),
    ("spec.internalTrafficPolicy", 1, "spec.internalTrafficPolicy must be a string, not int"),
    ("spec.externalTrafficPolicy", 1, "spec.externalTrafficPolicy must be a string, not int"),
    ("spec.externalTrafficPolicy", "Global", "spec.externalTrafficPolicy must be Cluster or Local, not 'Global'"),
    ("spec.ports", [{"port": 80, "nodePort": 70000}], "spec.ports[0].nodePort must be a port number 1-65535, not 7"),
    ("spec.ports", [{"port": 80, "nodePort": "30080"}], "spec.ports[0].nodePort must be a port number 1-65535, not '"),
    ("spec.trafficDistribution", ["PreferClose"], "spec.trafficDistribution must be a string, not list"),
    ("metadata.annotations", "x", "Service shop/web: metadata.annotations must be a mapping, not str"),
    ("spec.ipFamilies", "IPv4", "Service shop/web: spec.ipFamilies must be a list, not str"),
    ("spec.ipFamilies", ["IPv5"], "Service shop/web: spec.ipFamilies[0] must be IPv4 or IPv6, each once, not 'IPv5'"),
    ("spec.ipFamilies", ["IPv4", "IPv4"], "spec.ipFamilies[1] must be IPv4 or IPv6, each once, not 'IPv4'"),
    ("spec.ipFamilies", [4], "Service shop/web: spec.ipFamilies[0] must be a string, not int"),
    ("spec.ipFamilies", ["IPv6"], "Service shop/web: spec.clusterIPs[0] 10.96.0.1 is not of spec.ipFamilies[0] IPv6"),
    ("spec.clusterIPs", ["10.96.0.1", "10.96.0.2"],
     "Service shop/web: spec.clusterIPs[1] 10.96.0.2: a Service has one cluster IP of each family"),
])
def test_malformed_services_are_rejected_naming_the_field(path: str, value: Any, message: str) -> None:
    base = service("web", "shop", selector={"app": "web"})
    with pytest.raises(ObjectError) as raised:
        convert.service(_broken(path, value, base))
    assert message in str(raised.value)


# -- EndpointSlices ---------------------------------------------------------------------------------------------
def test_an_ipv6_endpoint_slice_is_read_like_an_ipv4_one() -> None:
    obj = endpoint_slice("db-v6", "shop", "db", ["fd00:0:0::0001", "fd00::2"], ports={"sql": 5432}, addressType="IPv6")
    eps = convert.endpoint_slice(obj)
    assert eps is not None and eps.endpoints == (("fd00::1", "node-a", True), ("fd00::2", "node-a", True))


def test_endpoint_slice_addresses_readiness_and_ports() -> None:
    obj = endpoint_slice("db-x", "shop", "db", ["10.1.0.1", "10.1.0.2"], ports={"sql": 5432, "": 80})
    obj["endpoints"][1]["conditions"] = {"ready": False}
    obj["endpoints"].append({"addresses": ["10.1.0.3"]})  # no conditions, no node: ready, nodeless
    obj["ports"].append({"name": "dns", "port": 53, "protocol": "UDP"})
    assert convert.endpoint_slice(obj) == SliceEndpoints(
        "shop", "db-x", "db", {"sql": 5432, "": 80},
        (("10.1.0.1", "node-a", True), ("10.1.0.2", "node-a", False), ("10.1.0.3", "", True)))


@pytest.mark.parametrize("obj", [
    {**endpoint_slice("x", "shop", "db", ["10.1.0.1"]), "metadata": {"name": "x", "namespace": "shop"}},
    endpoint_slice("x", "shop", "db", ["db.example.com"], addressType="FQDN"),
])
def test_slices_the_mesh_does_not_read(obj: dict[str, Any]) -> None:
    assert convert.endpoint_slice(obj) is None  # no Service label, or not IP addresses


@pytest.mark.parametrize(("path", "value", "message"), [
    ("endpoints", {"addresses": []}, "EndpointSlice shop/x: endpoints must be a list, not dict"),
    ("endpoints.0", "10.1.0.1", "EndpointSlice shop/x: endpoints[0] must be a mapping, not str"),
    ("endpoints.0.addresses", ["nope"], "EndpointSlice shop/x: endpoints[0].addresses[0] 'nope' is not an IP"),
    ("endpoints.0.addresses", "10.1.0.1", "endpoints[0].addresses must be a list, not str"),
    ("endpoints.0.conditions", ["ready"], "endpoints[0].conditions must be a mapping, not list"),
    ("endpoints.0.nodeName", 1, "endpoints[0].nodeName must be a string, not int"),
    ("ports", [{"name": "a", "port": 0}], "EndpointSlice shop/x: ports[0].port must be a port number 1-65535, not 0"),
    ("ports", [{"name": 1, "port": 80}], "ports[0].name must be a string, not int"),
    ("ports", ["a"], "ports[0] must be a mapping, not str"),
    ("metadata.labels", {"kubernetes.io/service-name": 5}, "EndpointSlice shop/x: metadata.labels must map strings"),
])
def test_malformed_slices_are_rejected_naming_the_field(path: str, value: Any, message: str) -> None:
    with pytest.raises(ObjectError) as raised:
        convert.endpoint_slice(_broken(path, value, endpoint_slice("x", "shop", "db", ["10.1.0.1"])))
    assert message in str(raised.value)


# -- namespaces and nodes ---------------------------------------------------------------------------------------
def test_namespaces_and_nodes() -> None:
    obj = namespace("shop", AMBIENT, {TD: "PreferClose"})
    assert convert.namespace_labels(obj) == AMBIENT
    assert convert.namespace_annotations(obj) == {TD: "PreferClose"}
    assert convert.node(node("n1", "zone-a")) == Node("n1", "zone-a")
    assert convert.node(node("n2")) == Node("n2", "")
    with pytest.raises(ObjectError, match=re.escape("Namespace shop: metadata.labels must map strings to strings")):
        convert.namespace_labels(namespace("shop", {"a": True}))  # type: ignore[dict-item]
    with pytest.raises(ObjectError, match=re.escape("Namespace shop: metadata.annotations must be a mapping, not")):
        convert.namespace_annotations(_broken("metadata.annotations", ["a"], namespace("shop")))
    with pytest.raises(ObjectError, match=re.escape("Node n1: metadata.labels must be a mapping, not str")):
        convert.node(_broken("metadata.labels", "zone", node("n1")))
