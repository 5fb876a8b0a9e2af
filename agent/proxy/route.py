"""Where an enrolled pod's outbound connection goes: a pure function of the mesh state (ztunnel's
``build_request``), carried out by the outbound proxy.

Order of decisions for a connection from local pod S to the original destination D = ip:port:
  1. D.ip is a workload's IP (workloads first, as ztunnel's ``find_address``): an enrolled workload is reached
     by HBONE to ``<its ip>:15008`` (or, on this node, through the local inbound path); any other workload is
     passed through unchanged.
  2. D.ip:D.port is a Service VIP: pick an endpoint (below); an enrolled endpoint gets HBONE with the CONNECT
     authority ``<pod ip>:<target port>`` and the Service's FQDN in ``forwarded: host=``, or local delivery on
     this node; an endpoint that is not enrolled gets plain TCP to ``<pod ip>:<target port>``. No endpoint
     serves that port: refused (``no healthy upstream``). A VIP without that port is refused too.
  3. Anything else is outside the mesh: passed through to D.

Endpoint choice: the candidates are the Service's endpoints that serve the port (unhealthy ones are not in
the store unless the Service publishes them) and whose address is of the family of D, the address the client
used: an IPv4 VIP leads to IPv4 pod addresses, an IPv6 VIP to IPv6 ones, as kube-proxy's per-family rules
and ztunnel's same-family pick do. When no endpoint has an address of that family (a single-stack pod behind a
dual-stack Service), the connection is refused as ``no healthy upstream`` naming the family, as kube-proxy
refuses it; ztunnel would fall back to the other family, but then the agent could not dial from the
client's own address (a socket has one family), and the destination's policy would see another source
than the client's. The Service's preference narrows the candidates to the client's node
(``internalTrafficPolicy: Local``: only there), or prefers its node and then its zone (``PreferSameNode``),
or its zone (``PreferClose``), falling back to all; then one is drawn uniformly at random, which is
ztunnel's random choice weighted by capacity, every capacity being 1 here. Random choice needs no shared
state between connections or agents and spreads load evenly in expectation; ztunnel uses it for the same
reasons.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from agent.mesh.model import Address, Endpoint, Preference, Service, Workload, ip_family
from agent.mesh.ports import Ports
from agent.mesh.store import MeshState
from hbone.identity import SpiffeId

Pick = Callable[[Sequence[Endpoint]], Endpoint]


class Kind(Enum):
    HBONE = "hbone"  # a tunnel to the destination node's agent
    LOCAL = "local"  # an enrolled pod of this node: the local inbound path (policy included)
    DIRECT = "direct"  # a Service endpoint outside the mesh: plain TCP to it, from the client's address
    PASSTHROUGH = "passthrough"  # not the mesh's: to the original destination, unchanged
    REFUSE = "refuse"  # nothing can serve it: the client is reset at once


@dataclass(frozen=True, slots=True)
class Route:
    kind: Kind
    target: Address  # where the bytes end up: the pod and its target port, or the original destination
    dial: Address | None = None  # what to connect to: the HBONE port of the target's node, or the target
    identity: SpiffeId | None = None  # HBONE: the identity the destination must prove
    workload: Workload | None = None  # the destination workload, when known
    service: Service | None = None  # when the client called a Service VIP
    reason: str = ""  # REFUSE: why

    @property
    def service_host(self) -> str | None:
        return self.service.hostname if self.service is not None else None


@dataclass(frozen=True, slots=True)
class Choice:
    """A Service VIP:port whose endpoints a connection draws from (``to_endpoint``)."""

    service: Service
    port: int  # the Service port called
    candidates: list[Endpoint]  # never empty


def route(source: Workload, destination: Address, state: MeshState, trust_domain: str, *,
          ports: Ports = Ports(), pick: Pick = random.choice) -> Route:
    """The route for a connection from ``source`` (an enrolled pod of this node) to ``destination``."""
    resolved = resolve(source, destination, state, trust_domain, ports=ports)
    if isinstance(resolved, Route):
        return resolved
    return to_endpoint(source, resolved, pick(resolved.candidates), state, trust_domain, ports=ports)


def resolve(source: Workload, destination: Address, state: MeshState, trust_domain: str, *,
            ports: Ports = Ports()) -> Route | Choice:
    """``route`` up to the draw: the route, or for a Service VIP:port with endpoints, the Choice to draw from."""
    ip, port = destination
    workload = state.by_ip(ip)
    if workload is not None:
        return _to_workload(source, workload, destination, None, trust_domain, ports)
    service = state.service_at(ip, port, source.namespace)
    if service is None:
        if ip in state.vips:
            return Route(Kind.REFUSE, destination, reason=f"no healthy upstream: {_names(state, ip)}:{port}")
        return Route(Kind.PASSTHROUGH, destination, dial=destination)
    endpoints = state.endpoints.get(service.key, {}).values()
    v6 = ":" in ip  # the family test inline: a call per endpoint would double route()'s cost on a big Service
    serving = [ep for ep in endpoints if port in ep.ports and (":" in ep.ip) == v6]
    candidates = _preferred(source, service, serving, state)
    if not candidates:
        other_family_only = not serving and any(port in ep.ports for ep in endpoints)
        why = f" (no IPv{ip_family(ip)} endpoint)" if other_family_only else ""
        return Route(Kind.REFUSE, destination, service=service,
                     reason=f"no healthy upstream: {service.key}:{port}{why}")
    return Choice(service, port, candidates)


def to_endpoint(source: Workload, choice: Choice, endpoint: Endpoint, state: MeshState, trust_domain: str, *,
                ports: Ports = Ports()) -> Route:
    """The route to ``endpoint``, drawn from ``choice``."""
    target = (endpoint.ip, endpoint.ports[choice.port])
    backend = state.by_ip(endpoint.ip)
    if backend is None or not backend.enrolled:
        return Route(Kind.DIRECT, target, dial=target, workload=backend, service=choice.service)
    return _to_workload(source, backend, target, choice.service, trust_domain, ports)


def _to_workload(source: Workload, workload: Workload, target: Address, service: Service | None,
                 trust_domain: str, ports: Ports) -> Route:
    if not workload.enrolled:
        return Route(Kind.PASSTHROUGH, target, dial=target, workload=workload, service=service)
    if workload.node == source.node:
        return Route(Kind.LOCAL, target, workload=workload, service=service)
    return Route(Kind.HBONE, target, dial=(target[0], ports.hbone), identity=workload.identity(trust_domain),
                 workload=workload, service=service)


def _preferred(source: Workload, service: Service, serving: list[Endpoint], state: MeshState) -> list[Endpoint]:
    """The endpoints ``service``'s preference keeps for a client on ``source``'s node."""
    preference = service.preference
    if preference is Preference.NODE_ONLY:
        return [ep for ep in serving if ep.node == source.node]
    if preference is Preference.SAME_NODE:
        same_node = [ep for ep in serving if ep.node == source.node]
        if same_node:
            return same_node
    if preference in (Preference.SAME_NODE, Preference.SAME_ZONE):
        zone = state.zone(source.node)
        same_zone = [ep for ep in serving if zone and state.zone(ep.node) == zone]
        if same_zone:
            return same_zone
    return serving


def _names(state: MeshState, vip: str) -> str:
    return ",".join(state.vips[vip])
