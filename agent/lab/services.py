"""Services in the lab: what the API server does when one is applied (validation, a cluster IP), and keeping
the nodes' kube-proxy tables (``kubeproxy``) and the pods' hosts files (``hosts``) in step with the state.

A Service gets its IP families and cluster IPs as the API server gives them (``service_ips``): single-stack
IPv4 unless it asks for more; in a dual-stack lab PreferDualStack and RequireDualStack Services get an IPv6
cluster IP of fd00:96::/112 too (and IPv6 single-stack ones one only), and their endpoints are the selected
pods' addresses of the Service's families. ``clusterIP: None`` makes it headless (no VIP); ExternalName
Services get none.

NodePort and LoadBalancer Services also get a node port per port (``spec.ports[].nodePort``), as the API server
gives them: one given must lie in ``NODE_PORTS`` (30000-32767) and be free for its protocol; a port applied
again without one keeps the one its namesake had (the API server's patch of allocated values); otherwise it
gets the lowest free port of the range above the static band (30086 and up: the API server leaves the band
30000-30085 to ports asked for by number, KEP-3668), then of the band. ``externalTrafficPolicy`` defaults to
Cluster. A LoadBalancer with ``allocateLoadBalancerNodePorts: false`` gets none; the lab has no load balancer
(no ``status.loadBalancer`` addresses): its LoadBalancer Services are reached by cluster IP and node port.

Endpoints are computed by the agent's own store (``agent.mesh.store``): what the lab's kube-proxy does with a
Service is what the agents think the Service is.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.lab import hosts, kubeproxy, service_ips
from agent.lab.runtime import LabInfo
from agent.lab.state import LabObjects, object_key
from agent.mesh.convert import ObjectError, endpoint_slice, service
from agent.mesh.store import MeshState, MeshStore

TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
EXTERNAL = ("NodePort", "LoadBalancer")  # the types with node ports and an external traffic policy
NODE_PORTS = range(30000, 32768)  # kube-apiserver's --service-node-port-range default
STATIC_BAND = range(NODE_PORTS.start, NODE_PORTS.start + min(max(16, len(NODE_PORTS) // 32), 128))  # 30000-30085


def _where(obj: Mapping[str, Any]) -> str:
    kind, namespace, name = object_key(obj)
    return f"{kind} {namespace}/{name}"


def _spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise ObjectError(f"{_where(obj)}: spec must be a mapping, not {type(spec).__name__}")
    return spec


class _NodePorts:
    """The node ports in use ((protocol, port) -> "ns/name")."""

    def __init__(self, services: Iterable[Mapping[str, Any]]) -> None:
        self.used: dict[tuple[str, int], str] = {}
        for obj in services:
            _kind, namespace, name = object_key(obj)
            for port in (obj.get("spec") or {}).get("ports") or []:
                if isinstance(port, dict) and isinstance(port.get("nodePort"), int) and port["nodePort"]:
                    self.used[(port.get("protocol") or "TCP", port["nodePort"])] = f"{namespace}/{name}"

    def take(self, protocol: str, number: int, owner: str, where: str, field: str) -> None:
        holder = self.used.get((protocol, number))
        if holder is not None and holder != owner:
            raise ObjectError(f"{where}: {field} {number} is already allocated to Service {holder}")
        self.used[(protocol, number)] = owner

    def allocate(self, protocol: str, owner: str, where: str, field: str) -> int:
        for number in itertools.chain(range(STATIC_BAND.stop, NODE_PORTS.stop), STATIC_BAND):
            if (protocol, number) not in self.used:
                self.used[(protocol, number)] = owner
                return number
        raise ObjectError(f"{where}: {field}: the node port range {_range(NODE_PORTS)} is full")


def _range(ports: range) -> str:
    return f"{ports.start}-{ports.stop - 1}"


Unassigned = tuple[dict[str, Any], int, str]  # (Service, index in spec.ports, protocol): a node port to allocate


def _asked_node_ports(obj: dict[str, Any], old: Mapping[str, Any] | None, node_ports: _NodePorts) -> list[Unassigned]:
    """Take the node ports a Service names (or its namesake ports had); return the ports that need one."""
    _kind, namespace, name = object_key(obj)
    owner, where, spec = f"{namespace}/{name}", _where(obj), obj["spec"]
    kind, ports = spec["type"], spec.get("ports")
    if not isinstance(ports, list):
        return []  # the Service's own check names the field
    allocate = kind == "NodePort" or (kind == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is not False)
    old_spec = (old or {}).get("spec") or {}
    old_ports = old_spec.get("ports") or [] if old_spec.get("type") in EXTERNAL else []
    kept = {p.get("name") or "": p.get("nodePort") for p in old_ports if isinstance(p, dict)}  # by port name
    asked = {p.get("nodePort") for p in ports if isinstance(p, dict)}
    unassigned: list[Unassigned] = []
    seen: set[tuple[str, int]] = set()
    for i, port in enumerate(ports):
        if not isinstance(port, dict) or not isinstance(protocol := port.get("protocol") or "TCP", str):
            continue  # the Service's own check names the field
        field, number = f"spec.ports[{i}].nodePort", port.get("nodePort")
        if number in (None, 0):
            if not allocate:
                continue
            number = kept.get(port.get("name") or "")
            if not isinstance(number, int) or not number or number in asked:
                unassigned.append((obj, i, protocol))
                continue
            port["nodePort"] = number
        elif kind not in EXTERNAL:
            raise ObjectError(f"{where}: {field} may not be used when spec.type is {kind}")
        elif isinstance(number, bool) or not isinstance(number, int) or number not in NODE_PORTS:
            raise ObjectError(f"{where}: {field} {number!r} is not in the node port range {_range(NODE_PORTS)}")
        if (protocol, number) in seen:
            raise ObjectError(f"{where}: {field} {number} is given to another port of the Service")
        seen.add((protocol, number))
        node_ports.take(protocol, number, owner, where, field)
    return unassigned


def _check_external(obj: dict[str, Any], kind: str, headless: bool) -> None:
    """What only NodePort and LoadBalancer Services may have; their externalTrafficPolicy defaults to Cluster."""
    where, spec = _where(obj), obj["spec"]
    if kind in EXTERNAL:
        if headless:
            raise ObjectError(f"{where}: spec.clusterIP: may not be None for {kind} Services")
        if spec.get("externalTrafficPolicy") in (None, ""):
            spec["externalTrafficPolicy"] = "Cluster"
    elif spec.get("externalTrafficPolicy") not in (None, ""):
        raise ObjectError(f"{where}: spec.externalTrafficPolicy may only be set for NodePort and LoadBalancer "
                          "Services")
    if not isinstance(spec.get("allocateLoadBalancerNodePorts", False), bool):
        raise ObjectError(f"{where}: spec.allocateLoadBalancerNodePorts must be true or false")


def admit(state: LabObjects, objects: Sequence[dict[str, Any]], *, dual_stack: bool = False) -> list[str]:
    """Validate the Services and EndpointSlices of a batch about to be applied to ``state`` and complete the
    Services as the API server of a lab (``dual_stack``: with an IPv6 service range too) does (``spec.type``,
    ``spec.clusterIP``, ``spec.clusterIPs``, ``spec.ipFamilies`` and ``spec.ipFamilyPolicy``: ``service_ips``;
    the node ports and ``spec.externalTrafficPolicy``), in place. Returns the errors, each naming the object and
    the field; the caller applies nothing when there are any."""
    errors: list[str] = []
    failed: set[tuple[str, str, str]] = set()  # one error per object: the first
    services = [o for o in objects if o.get("kind") == "Service"]
    lab = service_ips.ranges(dual_stack)
    allocator = service_ips.Allocator(state.of_kind("Service"), lab)
    pending: list[tuple[dict[str, Any], service_ips.Request]] = []
    for obj in services:  # addresses asked for first, so that a new one never takes an address asked for later
        _kind, namespace, name = object_key(obj)
        owner, where = f"{namespace}/{name}", _where(obj)
        try:
            kind = _spec(obj).setdefault("type", "ClusterIP")
            if kind not in TYPES:
                raise ObjectError(f"{where}: spec.type {kind!r}: the lab has {', '.join(TYPES)} Services only")
            if kind == "ExternalName":
                _check_external(obj, kind, headless=False)
                continue
            req = service_ips.request(obj, state.get("Service", namespace, name), lab)
            _check_external(obj, kind, req.headless)
            for i, ip in enumerate(req.ips):
                if ip is not None:
                    allocator.take(ip, owner, where, _ip_field(i))
            pending.append((obj, req))
        except ObjectError as e:
            errors.append(str(e))
            failed.add(object_key(obj))
    for obj, req in pending:
        _kind, namespace, name = object_key(obj)
        try:
            for i, ip in enumerate(req.ips):
                if ip is None:
                    req.ips[i] = allocator.allocate(req.families[i], f"{namespace}/{name}", _where(obj), _ip_field(i))
            service_ips.write(obj["spec"], req)
        except ObjectError as e:
            errors.append(str(e))
            failed.add(object_key(obj))
    errors += _admit_node_ports(state, [s for s in services if object_key(s) not in failed], failed)
    for obj in objects:
        if object_key(obj) in failed:
            continue
        try:
            if obj.get("kind") == "Service":
                service(obj)
            elif obj.get("kind") == "EndpointSlice":
                endpoint_slice(obj)
        except ObjectError as e:
            errors.append(str(e))
    return errors


def _ip_field(i: int) -> str:
    return "spec.clusterIP" if i == 0 else f"spec.clusterIPs[{i}]"


def _admit_node_ports(state: LabObjects, services: Sequence[dict[str, Any]],
                      failed: set[tuple[str, str, str]]) -> list[str]:
    """Node ports: those asked for (or kept) first, then the new ones. The batch's Services hold none of their
    old node ports: a batch is applied whole or not at all, so what they no longer name is free for the others."""
    errors: list[str] = []
    batch = {object_key(s) for s in services}
    node_ports = _NodePorts(s for s in state.of_kind("Service") if object_key(s) not in batch)
    unassigned: list[Unassigned] = []
    for obj in services:
        try:
            unassigned += _asked_node_ports(obj, state.get("Service", *object_key(obj)[1:]), node_ports)
        except ObjectError as e:
            errors.append(str(e))
            failed.add(object_key(obj))
    for obj, i, protocol in unassigned:
        _kind, namespace, name = key = object_key(obj)
        if key in failed:
            continue
        try:
            obj["spec"]["ports"][i]["nodePort"] = node_ports.allocate(protocol, f"{namespace}/{name}", _where(obj),
                                                                      f"spec.ports[{i}].nodePort")
        except ObjectError as e:
            errors.append(str(e))
            failed.add(key)
    return errors


def mesh_state(objects: Iterable[Mapping[str, Any]]) -> tuple[MeshState, list[ObjectError]]:
    """The agents' view of a cluster state (their store, fed the whole state), and the objects it refused:
    a bad object is left out and everything else is still in the view."""
    store = MeshStore()
    items = sorted(objects, key=lambda o: 0 if o.get("kind") == "Namespace" else 1)  # as build_state does
    errors = store.replace_all(items)
    return store.state, errors


def sync(info: LabInfo, objects: Iterable[Mapping[str, Any]]) -> list[ObjectError]:
    """Make every node's kube-proxy table and every pod's hosts file match the cluster state ``objects``;
    returns the objects the agents' store refused (left out, as the agents leave them out)."""
    state, errors = mesh_state(objects)
    families = kubeproxy.families(info.dual_stack)
    for node in info.nodes:
        kubeproxy.install(node.netns, kubeproxy.ruleset(state, node.name, families))
    for pod in info.pods:
        hosts.write_pod(pod.netns, hosts.hosts_file(state, pod.namespace, pod.name, pod.ips))
    return errors


# -- how status commands show a Service (the form of `ambit lab status --json` and the agents' /config_dump) --
def ports_text(ports: Sequence[Mapping[str, Any]]) -> str:
    """``80->8080/TCP,443->https/TCP``; with a node port (kubectl's ``80:30080/TCP``): ``80:30080->8080/TCP``."""
    return ",".join(f"{p['port']}{':' + str(p['node_port']) if p.get('node_port') else ''}->"
                    f"{p['target_name'] or p['target_port']}/TCP" for p in ports) or "<none>"


def endpoints_text(endpoints: Sequence[Mapping[str, Any]]) -> str:
    """``ip:target`` (``ip:t1,t2`` with several ports; ``[ip]:target`` for IPv6, as kubectl shows them) of each
    endpoint, IPv4 before IPv6, ``<none>`` without any."""
    ordered = sorted(endpoints, key=lambda e: ipaddress.get_mixed_type_key(ipaddress.ip_address(e["ip"])))
    return ", ".join(f"{_host(e['ip'])}:{','.join(str(t) for t in e['ports'].values()) or '-'}"
                     for e in ordered) or "<none>"


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
