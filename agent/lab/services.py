"""Services in the lab: what the API server does when one is applied (validation, a cluster IP), and keeping
the nodes' kube-proxy tables (``kubeproxy``) and the pods' hosts files (``hosts``) in step with the state.

A Service keeps the ``spec.clusterIP`` it is given (it must lie in ``SERVICE_CIDR`` and be free), keeps the
one it already has when it is applied again without one (a cluster IP is immutable), and otherwise gets the
lowest free address of ``SERVICE_CIDR``. ``clusterIP: None`` makes it headless (no VIP); ExternalName
Services get none. Only ClusterIP Services exist in the lab (no node ports, no load balancers), IPv4 only,
also in a dual-stack lab (``spec.ipFamilies: [IPv4]``: their endpoints are the pods' IPv4 addresses).

Endpoints are computed by the agent's own store (``agent.mesh.store``): what the lab's kube-proxy does with a
Service is what the agents think the Service is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.lab import hosts, kubeproxy
from agent.lab.runtime import LabInfo
from agent.lab.state import LabObjects, object_key
from agent.lab.topology import SERVICE_CIDR
from agent.mesh.convert import ObjectError, endpoint_slice, service
from agent.mesh.store import MeshState, MeshStore

HEADLESS = "None"
TYPES = ("ClusterIP", "ExternalName")


def _where(obj: Mapping[str, Any]) -> str:
    kind, namespace, name = object_key(obj)
    return f"{kind} {namespace}/{name}"


def _spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise ObjectError(f"{_where(obj)}: spec must be a mapping, not {type(spec).__name__}")
    return spec


def _requested_ip(obj: dict[str, Any]) -> str | None:
    """The cluster IP the object asks for: an address, HEADLESS, or None (none asked)."""
    where, spec = _where(obj), _spec(obj)
    single, several = spec.get("clusterIP"), spec.get("clusterIPs")
    if several is not None:
        if not isinstance(several, list) or not all(isinstance(ip, str) for ip in several):
            raise ObjectError(f"{where}: spec.clusterIPs must be a list of strings")
        if len(several) > 1:
            raise ObjectError(f"{where}: spec.clusterIPs: the lab is IPv4 only (one cluster IP), not {several}")
        if several and single not in (None, "", several[0]):
            raise ObjectError(f"{where}: spec.clusterIPs[0] {several[0]!r} must equal spec.clusterIP {single!r}")
        single = several[0] if several else single
    if single is None or single == "":
        return None
    if not isinstance(single, str):
        raise ObjectError(f"{where}: spec.clusterIP must be a string, not {type(single).__name__}")
    if single == HEADLESS:
        return HEADLESS
    try:
        ip = ipaddress.ip_address(single)
    except ValueError:
        raise ObjectError(f"{where}: spec.clusterIP {single!r} is not an IP address") from None
    if ip not in SERVICE_CIDR or ip in (SERVICE_CIDR.network_address, SERVICE_CIDR.broadcast_address):
        raise ObjectError(f"{where}: spec.clusterIP {single} is not in the service range {SERVICE_CIDR}")
    return str(ip)


def _current_ip(obj: Mapping[str, Any] | None) -> str | None:
    if obj is None:
        return None
    spec = obj.get("spec") or {}
    return spec.get("clusterIP") or None


class _Allocator:
    """The cluster IPs in use (address -> "ns/name") and the next candidate for a new one."""

    def __init__(self, services: Iterable[Mapping[str, Any]]) -> None:
        self.used: dict[str, str] = {}
        for obj in services:
            ip = _current_ip(obj)
            if ip and ip != HEADLESS:
                _kind, namespace, name = object_key(obj)
                self.used[ip] = f"{namespace}/{name}"
        self._hosts = SERVICE_CIDR.hosts()

    def take(self, ip: str, owner: str, where: str) -> None:
        holder = self.used.get(ip)
        if holder is not None and holder != owner:
            raise ObjectError(f"{where}: spec.clusterIP {ip} is already allocated to Service {holder}")
        self.used[ip] = owner

    def allocate(self, owner: str, where: str) -> str:
        for candidate in self._hosts:
            ip = str(candidate)
            if ip not in self.used:
                self.used[ip] = owner
                return ip
        raise ObjectError(f"{where}: spec.clusterIP: the service range {SERVICE_CIDR} is full")


def admit(state: LabObjects, objects: Sequence[dict[str, Any]]) -> list[str]:
    """Validate the Services and EndpointSlices of a batch about to be applied to ``state`` and complete the
    Services as the API server does (``spec.type``, ``spec.clusterIP``, ``spec.clusterIPs``, ``spec.ipFamilies``
    and ``spec.ipFamilyPolicy``), in place.
    Returns the errors, each naming the object and the field; the caller applies nothing when there are any."""
    errors: list[str] = []
    failed: set[tuple[str, str, str]] = set()  # one error per object: the first
    services = [o for o in objects if o.get("kind") == "Service"]
    allocator = _Allocator(state.of_kind("Service"))
    pending: list[tuple[dict[str, Any], str]] = []
    for obj in services:  # addresses asked for first, so that a new one never takes an address asked for later
        _kind, namespace, name = object_key(obj)
        owner, where = f"{namespace}/{name}", _where(obj)
        try:
            kind = _spec(obj).setdefault("type", "ClusterIP")
            if kind not in TYPES:
                raise ObjectError(f"{where}: spec.type {kind!r}: the lab has {' and '.join(TYPES)} Services only")
            asked = _requested_ip(obj)
            current = _current_ip(state.get("Service", namespace, name))
            if asked is not None and current is not None and asked != current:
                raise ObjectError(f"{where}: spec.clusterIP: field is immutable ({current}, not {asked})")
            if kind == "ExternalName":
                continue
            _set_families(obj, where)
            ip = asked or current
            if ip is not None and ip != HEADLESS:
                allocator.take(ip, owner, where)
            if ip is None:
                pending.append((obj, owner))
            else:
                _set_ip(obj, ip)
        except ObjectError as e:
            errors.append(str(e))
            failed.add(object_key(obj))
    for obj, owner in pending:
        try:
            _set_ip(obj, allocator.allocate(owner, _where(obj)))
        except ObjectError as e:
            errors.append(str(e))
            failed.add(object_key(obj))
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


def _set_families(obj: dict[str, Any], where: str) -> None:
    """``spec.ipFamilies`` and ``spec.ipFamilyPolicy`` as the API server of a cluster whose Services are IPv4 only
    sets them (the lab's, even when its pods are dual-stack): IPv4, single-stack; RequireDualStack or an IPv6
    family is refused, PreferDualStack ends single-stack."""
    spec = obj["spec"]
    families, policy = spec.get("ipFamilies"), spec.get("ipFamilyPolicy")
    if families not in (None, [], ["IPv4"]):
        raise ObjectError(f"{where}: spec.ipFamilies {families!r}: the lab's Services are IPv4 only")
    if policy not in (None, "SingleStack", "PreferDualStack"):
        raise ObjectError(f"{where}: spec.ipFamilyPolicy {policy!r}: the lab's Services are IPv4 only "
                          "(SingleStack or PreferDualStack)")
    spec["ipFamilies"], spec["ipFamilyPolicy"] = ["IPv4"], "SingleStack"


def _set_ip(obj: dict[str, Any], ip: str) -> None:
    spec = obj["spec"]
    spec["clusterIP"], spec["clusterIPs"] = ip, [ip]


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
    for node in info.nodes:
        kubeproxy.install(node.netns, kubeproxy.ruleset(state, node.name))
    for pod in info.pods:
        hosts.write_pod(pod.netns, hosts.hosts_file(state, pod.namespace, pod.name, pod.ips))
    return errors


# -- how status commands show a Service (the form of `ambit lab status --json` and the agents' /config_dump) --
def ports_text(ports: Sequence[Mapping[str, Any]]) -> str:
    """``80->8080/TCP,443->https/TCP``."""
    return ",".join(f"{p['port']}->{p['target_name'] or p['target_port']}/TCP" for p in ports) or "<none>"


def endpoints_text(endpoints: Sequence[Mapping[str, Any]]) -> str:
    """``ip:target`` (``ip:t1,t2`` with several ports) of each endpoint, ``<none>`` without any."""
    return ", ".join(f"{e['ip']}:{','.join(str(t) for t in e['ports'].values()) or '-'}"
                     for e in sorted(endpoints, key=lambda e: ipaddress.ip_address(e["ip"]))) or "<none>"
