"""The pod's probe ports (``Workload.probe_ports``): the TCP ports the kubelet connects to for the liveness,
readiness and startup probes of the pod's containers, read from pods shaped as the API server returns them;
a probe naming a port its container does not have is that probe's problem only (logged), a malformed probe
the pod's (ObjectError naming the field); and the store carries the ports and tells when they change."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest

from agent.mesh import convert
from agent.mesh.convert import ObjectError
from agent.mesh.store import MeshStore
from tests.fixtures.mesh_objects import namespace

# `kubectl get pod -o json` of a CoreDNS pod (trimmed of volumes and status details): probes on numbers.
COREDNS = json.loads("""
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "coredns-5d78c9869d-8xq2k", "namespace": "kube-system",
              "uid": "0f2a64a1-3c6d-4c4e-9f5e-1d2b3c4d5e6f", "creationTimestamp": "2026-01-05T10:00:00Z",
              "labels": {"k8s-app": "kube-dns", "pod-template-hash": "5d78c9869d"}},
 "spec": {"nodeName": "node-1", "serviceAccountName": "coredns", "serviceAccount": "coredns",
          "containers": [{"name": "coredns", "image": "registry.k8s.io/coredns/coredns:v1.11.1",
                          "args": ["-conf", "/etc/coredns/Corefile"],
                          "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"},
                                    {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"},
                                    {"containerPort": 9153, "name": "metrics", "protocol": "TCP"}],
                          "livenessProbe": {"failureThreshold": 5,
                                            "httpGet": {"path": "/health", "port": 8080, "scheme": "HTTP"},
                                            "initialDelaySeconds": 60, "periodSeconds": 10, "successThreshold": 1,
                                            "timeoutSeconds": 5},
                          "readinessProbe": {"failureThreshold": 3,
                                             "httpGet": {"path": "/ready", "port": 8181, "scheme": "HTTP"},
                                             "periodSeconds": 10, "successThreshold": 1, "timeoutSeconds": 1}}]},
 "status": {"phase": "Running", "hostIP": "192.168.200.10", "podIP": "10.200.0.5", "podIPs": [{"ip": "10.200.0.5"}],
            "conditions": [{"type": "Ready", "status": "True"}]}}
""")

# An application pod with named ports, all three kinds of probe, an Envoy-style sidecar (a native sidecar:
# an init container with restartPolicy Always) probed on its own named port, and an ordinary init container.
APP = json.loads("""
{"apiVersion": "v1", "kind": "Pod",
 "metadata": {"name": "web-7c9f6d8b5-abcde", "namespace": "shop", "uid": "u-web",
              "labels": {"app": "web"}},
 "spec": {"nodeName": "node-2", "serviceAccountName": "web",
          "initContainers": [
            {"name": "migrate", "image": "web:1", "command": ["migrate"],
             "ports": [{"containerPort": 7000, "name": "http"}],
             "readinessProbe": {"tcpSocket": {"port": "http"}}},
            {"name": "proxy", "image": "envoy:1", "restartPolicy": "Always",
             "ports": [{"containerPort": 9901, "name": "admin", "protocol": "TCP"}],
             "startupProbe": {"httpGet": {"path": "/ready", "port": "admin"}, "periodSeconds": 1}}],
          "containers": [
            {"name": "web", "image": "web:1",
             "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"},
                       {"containerPort": 8443, "name": "https", "protocol": "TCP"}],
             "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                                           "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
             "readinessProbe": {"tcpSocket": {"port": "https"}},
             "startupProbe": {"exec": {"command": ["cat", "/tmp/started"]}}},
            {"name": "grpc", "image": "grpc:1", "ports": [{"containerPort": 50051, "name": "grpc"}],
             "livenessProbe": {"grpc": {"port": 50052, "service": "liveness"}},
             "readinessProbe": {"httpGet": {"port": "http"}}}]},
 "status": {"phase": "Running", "podIP": "10.200.1.7", "podIPs": [{"ip": "10.200.1.7"}]}}
""")


def workload(obj: dict[str, Any]) -> Any:
    w = convert.pod_workload(obj, {})
    assert w is not None
    return w


def test_coredns_probes_on_numbered_ports() -> None:
    assert workload(COREDNS).probe_ports == frozenset({8080, 8181})


def test_named_ports_resolve_in_their_own_container_and_sidecars_are_probed(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "agent.mesh.convert"):
        w = workload(APP)
    # web: http 8080 (liveness), https 8443 (readiness), exec (no port); grpc: 50052 (the grpc probe's own
    # number, not its container port); proxy sidecar: admin 9901; the init container `migrate` is not probed
    assert w.probe_ports == frozenset({8080, 8443, 50052, 9901})
    # the grpc container's readinessProbe names "http", which only the web container has: that probe's problem
    assert [r.getMessage() for r in caplog.records] == [
        "Pod shop/web-7c9f6d8b5-abcde: spec.containers[1].readinessProbe.httpGet.port 'http': container 'grpc' "
        "has no port of that name (the kubelet cannot run this probe; it adds no probe port)"]
    assert dict(w.ports) == {"http": 8080, "https": 8443, "grpc": 50051}  # Service targets: app containers only


def probed(container: dict[str, Any], ip: str = "10.200.1.7") -> tuple[frozenset[int], list[str]]:
    return convert.probe_ports({"containers": [{"name": "c", **container}]}, (ip,), "Pod shop/p")


@pytest.mark.parametrize(("container", "ports"), [
    ({}, set()),
    ({"livenessProbe": None}, set()),
    ({"livenessProbe": {"exec": {"command": ["true"]}}}, set()),
    # the kubelet runs the first handler set (exec, httpGet, tcpSocket, grpc): the exec, here
    ({"livenessProbe": {"exec": {"command": ["true"]}, "httpGet": {"port": 80}}}, set()),
    ({"livenessProbe": {"httpGet": {"port": 80}, "tcpSocket": {"port": 81}}}, {80}),
    ({"livenessProbe": {"httpGet": {"port": 80, "host": "10.200.1.7"}}}, {80}),            # the pod's own address
    ({"livenessProbe": {"httpGet": {"port": 80, "host": "10.200.9.9"}}}, set()),           # another host's port
    ({"livenessProbe": {"tcpSocket": {"port": 81, "host": "db.example"}}}, set()),
    ({"readinessProbe": {"tcpSocket": {"port": "8081"}}}, {8081}),                         # digits: a number
    ({"ports": [{"name": "8081", "containerPort": 9000}],
      "readinessProbe": {"tcpSocket": {"port": "8081"}}}, {9000}),                         # ... unless a name
    ({"ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}],
      "readinessProbe": {"tcpSocket": {"port": "dns"}}}, {53}),                            # names: any protocol
    ({"ports": [{"name": "a", "containerPort": 1}, {"name": "a", "containerPort": 2}],
      "startupProbe": {"grpc": {"port": 9090}}, "livenessProbe": {"httpGet": {"port": "a"}}}, {1, 9090}),
])
def test_which_port_a_probe_connects_to(container: dict[str, Any], ports: set[int]) -> None:
    assert probed(container) == (frozenset(ports), [])


def test_an_ipv6_pod_probed_on_its_address() -> None:
    assert probed({"livenessProbe": {"httpGet": {"port": 80, "host": "fd00::0007"}}}, "fd00::7")[0] == {80}


@pytest.mark.parametrize("port", ["health", "", "99999", "0", "٨٠"])
def test_an_unresolvable_port_is_that_probes_problem_only(port: str) -> None:
    ports, problems = probed({"livenessProbe": {"httpGet": {"port": port}},
                              "readinessProbe": {"tcpSocket": {"port": 8080}}})
    assert ports == {8080}
    assert problems == [f"Pod shop/p: spec.containers[0].livenessProbe.httpGet.port {port!r}: container 'c' has no "
                        "port of that name (the kubelet cannot run this probe; it adds no probe port)"]


@pytest.mark.parametrize(("container", "message"), [
    ({"livenessProbe": "GET /"}, "Pod shop/p: spec.containers[0].livenessProbe must be a mapping, not str"),
    ({"livenessProbe": {"httpGet": [80]}}, "spec.containers[0].livenessProbe.httpGet must be a mapping, not list"),
    ({"livenessProbe": {"httpGet": {"path": "/"}}},
     "spec.containers[0].livenessProbe.httpGet.port must be a port number 1-65535, not None"),
    ({"readinessProbe": {"tcpSocket": {"port": 0}}},
     "spec.containers[0].readinessProbe.tcpSocket.port must be a port number 1-65535, not 0"),
    ({"readinessProbe": {"tcpSocket": {"port": 70000}}},
     "spec.containers[0].readinessProbe.tcpSocket.port must be a port number 1-65535, not 70000"),
    ({"readinessProbe": {"tcpSocket": {"port": True}}},
     "spec.containers[0].readinessProbe.tcpSocket.port must be a port number 1-65535, not True"),
    ({"startupProbe": {"grpc": {"port": "grpc"}}},
     "spec.containers[0].startupProbe.grpc.port must be a port number 1-65535, not 'grpc'"),
    ({"startupProbe": {"httpGet": {"port": 80, "host": 7}}},
     "spec.containers[0].startupProbe.httpGet.host must be a string, not int"),
    ({"ports": [{"name": "http", "containerPort": "80"}], "livenessProbe": {"httpGet": {"port": "http"}}},
     "spec.containers[0].ports[0].containerPort must be a port number 1-65535, not '80'"),
])
def test_a_malformed_probe_rejects_the_pod_naming_the_field(container: dict[str, Any], message: str) -> None:
    with pytest.raises(ObjectError) as raised:
        probed(container)
    assert message in str(raised.value)


@pytest.mark.parametrize(("spec", "message"), [
    ({"initContainers": {"proxy": {}}}, "Pod shop/p: spec.initContainers must be a list, not dict"),
    ({"initContainers": ["proxy"]}, "Pod shop/p: spec.initContainers[0] must be a mapping, not str"),
    ({"initContainers": [{"name": "proxy", "restartPolicy": True}]},
     "Pod shop/p: spec.initContainers[0].restartPolicy must be a string, not bool"),
    ({"initContainers": [{"name": "proxy", "restartPolicy": "Always", "livenessProbe": {"tcpSocket": {"port": -1}}}]},
     "spec.initContainers[0].livenessProbe.tcpSocket.port must be a port number 1-65535, not -1"),
])
def test_malformed_init_containers_reject_the_pod(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ObjectError) as raised:
        convert.probe_ports(spec, ("10.0.0.1",), "Pod shop/p")
    assert message in str(raised.value)


def test_the_store_carries_probe_ports_and_tells_when_they_change() -> None:
    store = MeshStore()
    assert store.apply([namespace("shop"), APP]) == []
    assert store.state.by_ip("10.200.1.7").probe_ports == {8080, 8443, 50052, 9901}  # type: ignore[union-attr]
    changes = []
    store.subscribe(lambda _state, change: changes.append(change))
    changed = copy.deepcopy(APP)
    changed["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 8444}}
    assert store.apply([changed]) == []
    assert [set(c.workloads) for c in changes] == [{"u-web"}]
    assert store.state.by_ip("10.200.1.7").probe_ports == {8080, 8444, 50052, 9901}  # type: ignore[union-attr]
    broken = copy.deepcopy(APP)
    broken["spec"]["containers"][0]["livenessProbe"] = {"httpGet": {"port": 0}}
    [error] = store.apply([broken])
    assert "Pod shop/web-7c9f6d8b5-abcde: spec.containers[0].livenessProbe.httpGet.port must be a port number" \
        in str(error)
    assert store.state.by_ip("10.200.1.7") is None  # a malformed pod is left out, as any malformed object
