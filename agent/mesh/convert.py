"""Kubernetes objects (plain dicts, as the API and the lab's file give them) to the mesh's typed values.

Each function reads one object and raises ``ObjectError`` naming the object and the field when the object
is malformed, whatever the types; ``None`` means "valid, but nothing for the mesh" (a pod not running yet,
an ExternalName Service). Enrollment follows Istio ambient exactly: ``istio.io/dataplane-mode=ambient`` on
the pod or its namespace enrolls it, ``none`` on the pod opts it out (any other pod value leaves the decision
to the namespace); pods with a sidecar and hostNetwork pods are never captured.
"""

from __future__ import annotations

import ipaddress
import logging
import reprlib
from collections.abc import Mapping
from typing import Any

from agent.mesh.model import (
    AMBIENT,
    BOTH_FAMILIES,
    DATAPLANE_MODE,
    NONE,
    SIDECAR_STATUS,
    ZONE_LABEL,
    Node,
    Preference,
    Service,
    ServicePort,
    SliceEndpoints,
    Workload,
    ip_family,
)

TRAFFIC_DISTRIBUTION_ANNOTATION = "networking.istio.io/traffic-distribution"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

EXTERNAL_TRAFFIC_POLICIES = ("Cluster", "Local")

log = logging.getLogger(__name__)


class ObjectError(ValueError):
    """A Kubernetes object the mesh cannot take; the message names the object and the field."""


def _mapping(value: Any, where: str, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ObjectError(f"{where}: {field} must be a mapping, not {type(value).__name__}")
    return value


def _list(value: Any, where: str, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ObjectError(f"{where}: {field} must be a list, not {type(value).__name__}")
    return value


def _string(value: Any, where: str, field: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise ObjectError(f"{where}: {field} must be a string, not {type(value).__name__}")
    return value


def _port(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ObjectError(f"{where}: {field} must be a port number 1-65535, not {_short(value)}")
    return value


def _ip(value: Any, where: str, field: str) -> str:
    text = _string(value, where, field)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ObjectError(f"{where}: {field} {_short(text)} is not an IP address") from None


class _Shown(reprlib.Repr):
    """``repr`` for messages: a few levels deep, a few items wide, integers of any size."""

    def repr_int(self, x: int, level: int) -> str:
        return super().repr_int(x, level) if x.bit_length() <= 128 else f"<an integer of {x.bit_length()} bits>"


_SHOWN = _Shown()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 3, 60, 40


def _short(value: Any) -> str:
    text = _SHOWN.repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def string_map(value: Any, where: str, field: str) -> dict[str, str]:
    labels = _mapping(value, where, field)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ObjectError(f"{where}: {field} must map strings to strings")
    return dict(labels)


def identify(obj: Any) -> tuple[str, str, str]:
    """(kind, namespace, name) of an object; ``namespace`` is "" for cluster-scoped kinds."""
    if not isinstance(obj, Mapping):
        raise ObjectError(f"every item must be a Kubernetes object (a mapping), not {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ObjectError(f"an object without a kind: kind must be a non-empty string, not {_short(kind)}")
    meta = _mapping(obj.get("metadata"), kind, "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ObjectError(f"{kind}: metadata.name must be a non-empty string, not {_short(name)}")
    if kind in ("Namespace", "Node"):
        return kind, "", name
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not namespace:
        raise ObjectError(f"{kind} {name}: metadata.namespace must be a non-empty string, not {_short(namespace)}")
    return kind, namespace, name


def namespace_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    _kind, _ns, name = identify(obj)
    return string_map(obj["metadata"].get("labels"), f"Namespace {name}", "metadata.labels")


def namespace_annotations(obj: Mapping[str, Any]) -> dict[str, str]:
    _kind, _ns, name = identify(obj)
    return string_map(obj["metadata"].get("annotations"), f"Namespace {name}", "metadata.annotations")


def enrolled(pod: Mapping[str, Any], namespace_labels: Mapping[str, str]) -> bool:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    if spec.get("hostNetwork"):
        return False
    if SIDECAR_STATUS in (meta.get("annotations") or {}) or any(
            c.get("name") == "istio-proxy" for c in spec.get("containers") or [] if isinstance(c, dict)):
        return False
    mode = (meta.get("labels") or {}).get(DATAPLANE_MODE)
    if mode == AMBIENT:
        return True
    if mode == NONE:
        return False
    return namespace_labels.get(DATAPLANE_MODE) == AMBIENT  # any other pod value leaves it to the namespace


def _ready(status: Mapping[str, Any], where: str) -> bool:
    for i, raw in enumerate(_list(status.get("conditions"), where, "status.conditions")):
        condition = _mapping(raw, where, f"status.conditions[{i}]")
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return True  # no conditions reported (the lab's pods): a running pod is ready


def _containers(spec: Mapping[str, Any], where: str, kind: str = "containers") -> list[tuple[str, Mapping[str, Any]]]:
    """``spec.<kind>`` (containers or initContainers): each container with its field path."""
    return [(f"spec.{kind}[{i}]", _mapping(raw, where, f"spec.{kind}[{i}]"))
            for i, raw in enumerate(_list(spec.get(kind), where, f"spec.{kind}"))]


def _declared_ports(container: Mapping[str, Any], where: str, field: str) -> list[tuple[str, int, str]]:
    """(name, number, protocol) of each port a container declares."""
    found = []
    for j, raw_port in enumerate(_list(container.get("ports"), where, f"{field}.ports")):
        at = f"{field}.ports[{j}]"
        port = _mapping(raw_port, where, at)
        name = _string(port.get("name"), where, f"{at}.name")
        number = _port(port.get("containerPort"), where, f"{at}.containerPort")
        found.append((name, number, _string(port.get("protocol"), where, f"{at}.protocol", "TCP")))
    return found


def _container_ports(spec: Mapping[str, Any], where: str) -> dict[str, int]:
    named: dict[str, int] = {}
    for field, container in _containers(spec, where):
        for name, number, protocol in _declared_ports(container, where, field):
            if name and protocol == "TCP":
                named.setdefault(name, number)
    return named


PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")  # the kubelet runs the first one a probe sets


class _Unresolved(Exception):
    """A probe's port that names no port of its container: the kubelet's probe fails, the pod stays."""


def probe_ports(spec: Mapping[str, Any], ips: tuple[str, ...], where: str) -> tuple[frozenset[int], list[str]]:
    """The TCP ports of the pod that the kubelet connects to for its probes, and the probes whose port could not
    be resolved (each message naming the object and the field). The probed containers are the app containers
    and the init containers that run beside them (sidecars: ``restartPolicy: Always``), as the kubelet probes
    them. A port is a number, or a name resolved against that container's own ``ports`` (the kubelet's lookup:
    any protocol; a name of digits that no port has is read as a number). ``exec`` probes, and probes whose
    ``host`` is not one of the pod's addresses, connect to no port of the pod. A malformed probe raises
    ObjectError; a name no port has is a problem of that probe only."""
    sidecars = [(field, c) for field, c in _containers(spec, where, "initContainers")
                if _string(c.get("restartPolicy"), where, f"{field}.restartPolicy") == "Always"]
    ports: set[int] = set()
    problems: list[str] = []
    for field, container in [*_containers(spec, where), *sidecars]:
        named: dict[str, int] = {}
        for name, number, _protocol in _declared_ports(container, where, field):
            named.setdefault(name, number)
        for kind in PROBES:
            if container.get(kind) is None:
                continue
            probe = _mapping(container[kind], where, f"{field}.{kind}")
            try:
                port = _probe_port(probe, named, ips, where, f"{field}.{kind}")
            except _Unresolved as e:
                name = _string(container.get("name"), where, f"{field}.name")
                problems.append(f"{where}: {e}: container {name!r} has no port of that name (the kubelet cannot run "
                                "this probe; it adds no probe port)")
                continue
            if port is not None:
                ports.add(port)
    return frozenset(ports), problems


def _probe_port(probe: Mapping[str, Any], named: Mapping[str, int], ips: tuple[str, ...], where: str,
                field: str) -> int | None:
    handler = next((h for h in PROBE_HANDLERS if probe.get(h) is not None), None)
    if handler is None or handler == "exec":
        return None
    action = _mapping(probe[handler], where, f"{field}.{handler}")
    at = f"{field}.{handler}.port"
    host = "" if handler == "grpc" else _string(action.get("host"), where, f"{field}.{handler}.host")
    value = action.get("port")
    if handler == "grpc" or not isinstance(value, str):  # grpc.port is a number only
        port = _port(value, where, at)
    elif value in named:
        port = named[value]
    elif value.isascii() and value.isdigit() and len(value.lstrip("0")) <= 5 and 1 <= int(value) <= 65535:
        port = int(value)
    else:
        raise _Unresolved(f"{at} {_short(value)}")
    return port if not host or _normal_ip(host) in ips else None  # another host: not a port of this pod


def _normal_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text  # a host name: not one of the pod's addresses


def pod_workload(pod: Mapping[str, Any], namespace_labels: Mapping[str, str],
                 problems: list[str] | None = None) -> Workload | None:
    """The workload a Pod is, or None when it has no address of its own yet (not running, not scheduled,
    hostNetwork). A probe whose port names no port of its container is left out of ``probe_ports`` and its
    problem appended to ``problems``, or logged (for a workload) when that is None."""
    _kind, namespace, name = identify(pod)
    where = f"Pod {namespace}/{name}"
    meta = pod["metadata"]
    spec = _mapping(pod.get("spec"), where, "spec")
    status = _mapping(pod.get("status"), where, "status")
    labels = string_map(meta.get("labels"), where, "metadata.labels")
    string_map(meta.get("annotations"), where, "metadata.annotations")
    node = _string(spec.get("nodeName"), where, "spec.nodeName")
    phase = _string(status.get("phase"), where, "status.phase", "Running")
    ips = [_ip(status.get("podIP"), where, "status.podIP")] if status.get("podIP") else []
    for i, entry in enumerate(_list(status.get("podIPs"), where, "status.podIPs")):
        ip = _ip(_mapping(entry, where, f"status.podIPs[{i}]").get("ip"), where, f"status.podIPs[{i}].ip")
        if ip not in ips:
            ips.append(ip)
    ports = _container_ports(spec, where)
    probed, unresolved = probe_ports(spec, tuple(ips), where)
    ready = _ready(status, where) and meta.get("deletionTimestamp") is None
    if problems is not None:
        problems += unresolved
    if not ips or not node or phase != "Running" or spec.get("hostNetwork"):
        return None
    for problem in unresolved if problems is None else ():
        log.warning("%s", problem)
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return Workload(
        namespace=namespace, name=name, node=node, ips=tuple(ips),
        uid=_string(meta.get("uid"), where, "metadata.uid") or f"{namespace}/{name}",
        service_account=_string(account, where, "spec.serviceAccountName"), labels=labels,
        enrolled=enrolled(pod, namespace_labels), ready=ready, ports=ports, probe_ports=probed,
        created=_string(meta.get("creationTimestamp"), where, "metadata.creationTimestamp"))


def _service_port(raw: Any, where: str, i: int) -> ServicePort | None:
    field = f"spec.ports[{i}]"
    port = _mapping(raw, where, field)
    if _string(port.get("protocol"), where, f"{field}.protocol", "TCP") != "TCP":
        return None  # the mesh carries TCP
    number = _port(port.get("port"), where, f"{field}.port")
    target = port.get("targetPort", number)
    if isinstance(target, str) and not target.isdigit():
        if not target:
            raise ObjectError(f"{where}: {field}.targetPort must not be empty")
        target_port, target_name = 0, target
    else:
        if isinstance(target, str):
            digits = target.lstrip("0") or "0"  # int() refuses over 4300 digits, leading zeros included
            target = int(digits) if len(digits) <= 5 else target
        target_port, target_name = _port(target, where, f"{field}.targetPort"), ""
    node_port = port.get("nodePort")
    return ServicePort(number, target_port, target_name,
                       _string(port.get("appProtocol"), where, f"{field}.appProtocol"),
                       _string(port.get("name"), where, f"{field}.name"),
                       0 if node_port in (None, 0) else _port(node_port, where, f"{field}.nodePort"))


def _preference(spec: Mapping[str, Any], annotations: Mapping[str, str],
                namespace_annotations: Mapping[str, str], where: str) -> Preference:
    if _string(spec.get("internalTrafficPolicy"), where, "spec.internalTrafficPolicy") == "Local":
        return Preference.NODE_ONLY
    distribution = (_string(spec.get("trafficDistribution"), where, "spec.trafficDistribution")
                    or annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION)
                    or namespace_annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION, ""))
    if distribution in ("PreferClose", "PreferSameZone"):
        return Preference.SAME_ZONE
    if distribution == "PreferSameNode":
        return Preference.SAME_NODE
    return Preference.NONE


_FAMILIES = {"IPv4": 4, "IPv6": 6}


def _families(spec: Mapping[str, Any], vips: tuple[str, ...], where: str) -> frozenset[int]:
    """``spec.ipFamilies`` as IP versions; without it, the families of the cluster IPs (a headless Service with
    neither takes pod addresses of both). Each cluster IP must be of the family at its index, as the API
    server requires."""
    given = _list(spec.get("ipFamilies"), where, "spec.ipFamilies")
    families = []
    for i, raw in enumerate(given):
        family = _FAMILIES.get(_string(raw, where, f"spec.ipFamilies[{i}]"))
        if family is None or family in families:
            raise ObjectError(f"{where}: spec.ipFamilies[{i}] must be IPv4 or IPv6, each once, not {_short(raw)}")
        families.append(family)
    for i, vip in enumerate(vips):
        if ip_family(vip) in map(ip_family, vips[:i]):
            raise ObjectError(f"{where}: spec.clusterIPs[{i}] {vip}: a Service has one cluster IP of each family")
        if i < len(families) and ip_family(vip) != families[i]:
            raise ObjectError(f"{where}: spec.clusterIPs[{i}] {vip} is not of spec.ipFamilies[{i}] "
                              f"IPv{families[i]}")
    if not families:
        return frozenset(ip_family(v) for v in vips) or BOTH_FAMILIES
    return frozenset(families)


def service(obj: Mapping[str, Any], namespace_annotations: Mapping[str, str] | None = None) -> Service | None:
    """The Service a Kubernetes Service is; None for ExternalName Services (not in the mesh)."""
    _kind, namespace, name = identify(obj)
    where = f"Service {namespace}/{name}"
    meta = obj["metadata"]
    annotations = string_map(meta.get("annotations"), where, "metadata.annotations")
    spec = _mapping(obj.get("spec"), where, "spec")
    if spec.get("type") == "ExternalName":
        return None
    raw_vips = _list(spec.get("clusterIPs"), where, "spec.clusterIPs") or (
        [spec["clusterIP"]] if spec.get("clusterIP") is not None else [])
    vips = tuple(_ip(v, where, "spec.clusterIPs") for v in raw_vips if v not in ("", "None"))
    ports = tuple(p for i, raw in enumerate(_list(spec.get("ports"), where, "spec.ports"))
                  if (p := _service_port(raw, where, i)) is not None)
    selector = string_map(spec.get("selector"), where, "spec.selector") or None
    publish = spec.get("publishNotReadyAddresses", False)
    if not isinstance(publish, bool):
        raise ObjectError(f"{where}: spec.publishNotReadyAddresses must be true or false")
    external = _string(spec.get("externalTrafficPolicy"), where, "spec.externalTrafficPolicy") or "Cluster"
    if external not in EXTERNAL_TRAFFIC_POLICIES:
        raise ObjectError(f"{where}: spec.externalTrafficPolicy must be Cluster or Local, not {_short(external)}")
    return Service(namespace, name, vips, ports, selector,
                   _preference(spec, annotations, namespace_annotations or {}, where), publish, external == "Local",
                   _families(spec, vips, where))


def endpoint_slice(obj: Mapping[str, Any]) -> SliceEndpoints | None:
    """An EndpointSlice's addresses and ports; None when it belongs to no Service or is not IP-addressed."""
    _kind, namespace, name = identify(obj)
    where = f"EndpointSlice {namespace}/{name}"
    labels = string_map(obj["metadata"].get("labels"), where, "metadata.labels")
    service_name = labels.get(SERVICE_NAME_LABEL)
    if not service_name or obj.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return None
    ports: dict[str, int] = {}
    for i, raw in enumerate(_list(obj.get("ports"), where, "ports")):
        port = _mapping(raw, where, f"ports[{i}]")
        if _string(port.get("protocol"), where, f"ports[{i}].protocol", "TCP") == "TCP":
            ports[_string(port.get("name"), where, f"ports[{i}].name")] = _port(port.get("port"), where,
                                                                                f"ports[{i}].port")
    endpoints: list[tuple[str, str, bool]] = []
    for i, raw in enumerate(_list(obj.get("endpoints"), where, "endpoints")):
        endpoint = _mapping(raw, where, f"endpoints[{i}]")
        conditions = _mapping(endpoint.get("conditions"), where, f"endpoints[{i}].conditions")
        ready = conditions.get("ready") is not False  # unset means ready
        node = _string(endpoint.get("nodeName"), where, f"endpoints[{i}].nodeName")
        for j, address in enumerate(_list(endpoint.get("addresses"), where, f"endpoints[{i}].addresses")):
            endpoints.append((_ip(address, where, f"endpoints[{i}].addresses[{j}]"), node, ready))
    return SliceEndpoints(namespace, name, service_name, ports, tuple(endpoints))


def node(obj: Mapping[str, Any]) -> Node:
    _kind, _ns, name = identify(obj)
    labels = string_map(obj["metadata"].get("labels"), f"Node {name}", "metadata.labels")
    return Node(name, labels.get(ZONE_LABEL, ""))
