"""The mesh as the agent sees it: typed workloads, services and their endpoints (ztunnel's state model).

Values only: frozen, hashable where it matters, no I/O. ``convert`` makes them from Kubernetes objects and
``store`` keeps them with their indexes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from hbone.identity import SpiffeId

DATAPLANE_MODE = "istio.io/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"
SIDECAR_STATUS = "sidecar.istio.io/status"
ZONE_LABEL = "topology.kubernetes.io/zone"
CLUSTER_DOMAIN = "cluster.local"

Address = tuple[str, int]  # (IP or host, port): a socket address, where something listens or connects
BOTH_FAMILIES = frozenset({4, 6})


def ip_family(ip: str) -> int:
    """4 or 6: the IP version of an address as the store spells it (``convert`` makes every one canonical)."""
    return 6 if ":" in ip else 4


@dataclass(frozen=True, slots=True)
class Workload:
    """A running pod with addresses of its own (hostNetwork pods share the node's and are not workloads)."""

    namespace: str
    name: str
    uid: str
    node: str
    ips: tuple[str, ...]  # status.podIPs, the primary (status.podIP) first; one of each family at most
    service_account: str
    labels: Mapping[str, str]
    enrolled: bool
    ready: bool = True  # Ready condition true and not being deleted: a healthy endpoint
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports (TCP)
    created: str = ""  # creationTimestamp: the newest of two pods claiming one IP wins it
    # The TCP ports the kubelet connects to for its probes of the pod's containers (liveness, readiness,
    # startup: httpGet, tcpSocket, grpc; named ports resolved in their container): ``convert.probe_ports``.
    probe_ports: frozenset[int] = frozenset()

    @property
    def ip(self) -> str:
        return self.ips[0]

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Preference(Enum):
    """How a Service prefers endpoints near the client (Istio's LoadBalancing, as istiod derives it)."""

    NONE = "none"  # every healthy endpoint alike
    NODE_ONLY = "node-only"  # internalTrafficPolicy: Local: only the client's node, else nothing
    SAME_ZONE = "same-zone"  # trafficDistribution PreferClose/PreferSameZone: the client's zone if any there
    SAME_NODE = "same-node"  # trafficDistribution PreferSameNode: node, else zone, else any


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    target_port: int  # 0 when the target port is named (resolved per pod)
    target_name: str = ""  # the container port name, when named
    app_protocol: str = ""
    name: str = ""
    node_port: int = 0  # spec.ports[].nodePort of a NodePort or LoadBalancer Service; 0: none


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    vips: tuple[str, ...]  # spec.clusterIPs; empty for a headless Service
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str] | None  # None: endpoints come from EndpointSlices
    preference: Preference = Preference.NONE
    publish_not_ready: bool = False
    external_local: bool = False  # externalTrafficPolicy: Local (node ports reach this node's endpoints only)
    families: frozenset[int] = BOTH_FAMILIES  # spec.ipFamilies: the pod addresses that are its endpoints

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == number), None)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend address of a Service (an address of a selected pod, or an EndpointSlice address:
    ``MeshState.by_ip`` tells which workload, if any, is there) and the target port for each service port it
    serves; a pod lacking a named target port has no entry for that port. A dual-stack pod of a dual-stack
    Service is two endpoints, one per family, as in the Service's two EndpointSlices."""

    ip: str
    node: str
    ports: Mapping[int, int]  # service port -> target port on this endpoint
    ready: bool = True


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    zone: str = ""


@dataclass(frozen=True, slots=True)
class SliceEndpoints:
    """An EndpointSlice of a selector-less Service, as read."""

    namespace: str
    name: str
    service: str  # kubernetes.io/service-name
    ports: Mapping[str, int]  # port name -> port
    endpoints: tuple[tuple[str, str, bool], ...]  # (address, node, ready)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
