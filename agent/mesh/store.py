"""The agent's store of the mesh: typed snapshots with indexes, updated by deltas.

A source (the lab's state file, or Kubernetes informers) hands the store object events; the store converts
only what changed, updates its indexes, and publishes a new ``MeshState``. A snapshot is never modified
after it is published: readers on the data path (and the kernel and telemetry threads) hold one snapshot
and never see half an update. A new snapshot shares every index the change did not touch with the previous
one, so a pod event costs work proportional to that pod, its namespace's Services and their endpoints,
never a rebuild of the world. Subscribers are told what changed (``Change``).

Endpoints follow istiod's ambient rules: a Service with a selector has the Running pods of its namespace
that match it, healthy (Ready, not being deleted) unless ``publishNotReadyAddresses``; a named target port
is resolved per pod from its container ports and a pod without that name serves nothing on that port; a
Service without a selector takes its EndpointSlices' addresses. Two pods claiming one IP: the newest holds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.mesh import convert
from agent.mesh.convert import ObjectError
from agent.mesh.model import (
    AMBIENT,
    DATAPLANE_MODE,
    NONE,
    Endpoint,
    Node,
    Service,
    SliceEndpoints,
    Workload,
)

__all__ = [
    "AMBIENT", "DATAPLANE_MODE", "NONE", "Change", "MeshState", "MeshStore", "ObjectError", "Workload",
    "build_state", "enrolled",
]

log = logging.getLogger(__name__)

enrolled = convert.enrolled
Key = tuple[str, str, str]  # (kind, namespace, name)
TYPED_KINDS = frozenset({"Namespace", "Pod", "Service", "EndpointSlice", "Node"})


@dataclass(frozen=True)
class MeshState:
    """One published snapshot. Every mapping is read-only by convention: the store replaces, never mutates."""

    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # name -> labels
    workloads: Mapping[str, Workload] = field(default_factory=dict)  # by every pod IP
    by_uid: Mapping[str, Workload] = field(default_factory=dict)
    services: Mapping[str, Service] = field(default_factory=dict)  # by "ns/name"
    vips: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # VIP -> service keys
    hostnames: Mapping[str, str] = field(default_factory=dict)  # FQDN -> service key
    services_in: Mapping[str, frozenset[str]] = field(default_factory=dict)  # namespace -> service keys
    endpoints: Mapping[str, Mapping[str, Endpoint]] = field(default_factory=dict)  # service key -> ip -> endpoint
    nodes: Mapping[str, Node] = field(default_factory=dict)
    objects: tuple[Mapping[str, Any], ...] = ()  # everything else (policies), for their own parsers

    def by_ip(self, ip: str) -> Workload | None:
        return self.workloads.get(ip)

    def on_node(self, node: str) -> list[Workload]:
        return [w for w in self.by_uid.values() if w.node == node]

    def service_at(self, vip: str, port: int, client_namespace: str = "") -> Service | None:
        """The Service with ``vip``:``port`` (the client's namespace first when several share the VIP)."""
        keys = self.vips.get(vip, ())
        found = [s for k in keys if (s := self.services.get(k)) is not None and s.port(port) is not None]
        if not found:
            return None
        return next((s for s in found if s.namespace == client_namespace), found[0])

    def service_serving(self, ip: str, port: int) -> Service | None:
        """A Service whose endpoint ``ip`` serves target ``port`` (ztunnel's guess of the Service of an inbound
        connection that did not name one); the first by name when several do."""
        workload = self.by_ip(ip)
        if workload is None:
            return None
        for key in sorted(self.services_in.get(workload.namespace, ())):
            endpoint = self.endpoints.get(key, {}).get(ip)
            if endpoint is not None and port in endpoint.ports.values():
                return self.services[key]
        return None

    def zone(self, node: str) -> str:
        known = self.nodes.get(node)
        return known.zone if known is not None else ""



@dataclass
class Change:
    """What one update changed: subscribers look here instead of comparing snapshots."""

    workloads: dict[str, Workload | None] = field(default_factory=dict)  # uid -> new (None: gone)
    removed: dict[str, Workload] = field(default_factory=dict)  # uid -> the workload that went away
    services: set[str] = field(default_factory=set)  # keys whose Service or endpoints changed
    namespaces: set[str] = field(default_factory=set)
    objects: bool = False  # policies (or other untyped objects) changed
    nodes: bool = False

    def __bool__(self) -> bool:
        return bool(self.workloads or self.services or self.namespaces or self.objects or self.nodes)


Subscriber = Callable[[MeshState, Change], None]


def _key(obj: Mapping[str, Any]) -> Key:
    return convert.identify(obj)


class MeshStore:
    """The store: ``apply`` object events, read ``state``, ``subscribe`` to changes."""

    def __init__(self) -> None:
        self.state = MeshState()
        self._subscribers: list[Subscriber] = []
        self._raw: dict[Key, Mapping[str, Any]] = {}  # every object taken, as given
        self._ns_labels: dict[str, dict[str, str]] = {}
        self._ns_annotations: dict[str, dict[str, str]] = {}
        self._pods_in: dict[str, set[str]] = {}  # namespace -> pod names (with or without a workload)
        self._workloads: dict[str, Workload] = {}  # uid -> workload
        self._pod_uid: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid of its workload
        self._claims: dict[str, set[str]] = {}  # ip -> uids claiming it
        self._by_ip: dict[str, Workload] = {}
        self._services: dict[str, Service] = {}
        self._services_in: dict[str, set[str]] = {}  # namespace -> service names
        self._vips: dict[str, tuple[str, ...]] = {}
        self._hostnames: dict[str, str] = {}
        self._slices: dict[str, SliceEndpoints] = {}  # slice key -> slice
        self._slices_of: dict[str, set[str]] = {}  # service key -> slice keys
        self._endpoints: dict[str, Mapping[str, Endpoint]] = {}
        self._nodes: dict[str, Node] = {}
        self._others: dict[Key, Mapping[str, Any]] = {}

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    # -- updates ---------------------------------------------------------------------------------------------
    def apply(self, upserts: Iterable[Any] = (), deletes: Iterable[Key] = ()) -> list[ObjectError]:
        """Take objects added or changed and keys deleted, publish one snapshot, tell the subscribers.

        An object the mesh cannot take is left out (its previous version, if any, is removed) and returned
        among the errors; everything else still applies.
        """
        change = Change()
        errors: list[ObjectError] = []
        for key in deletes:
            self._delete(key, change)
        for obj in upserts:
            try:
                key = _key(obj)
            except ObjectError as e:
                errors.append(e)
                continue
            if self._raw.get(key) == obj:
                continue
            try:
                self._upsert(key, obj, change)
            except ObjectError as e:
                errors.append(e)
                self._delete(key, change)
        if change:
            self._publish(change)
        return errors

    def replace_all(self, objects: Iterable[Any]) -> list[ObjectError]:
        """Make the store hold exactly ``objects`` (a whole file, a relist): only the differences are applied."""
        wanted: dict[Key, Any] = {}
        errors: list[ObjectError] = []
        for obj in objects:
            try:
                wanted[_key(obj)] = obj
            except ObjectError as e:
                errors.append(e)
        gone = [key for key in self._raw if key not in wanted]
        return errors + self.apply([obj for key, obj in wanted.items() if self._raw.get(key) != obj], gone)

    def _upsert(self, key: Key, obj: Mapping[str, Any], change: Change) -> None:
        kind, namespace, name = key
        if kind == "Namespace":
            labels = convert.namespace_labels(obj)
            annotations = convert.namespace_annotations(obj)
            self._raw[key] = obj
            self._set_namespace(name, labels, annotations, change)
        elif kind == "Pod":
            workload = convert.pod_workload(obj, self._ns_labels.get(namespace, {}))
            self._raw[key] = obj
            self._pods_in.setdefault(namespace, set()).add(name)
            self._set_pod(namespace, name, workload, change)
        elif kind == "Service":
            svc = convert.service(obj, self._ns_annotations.get(namespace, {}))
            self._raw[key] = obj
            self._set_service(namespace, name, svc, change)
        elif kind == "EndpointSlice":
            eps = convert.endpoint_slice(obj)
            self._raw[key] = obj
            self._set_slice(f"{namespace}/{name}", eps, change)
        elif kind == "Node":
            self._raw[key] = obj
            self._nodes[name] = convert.node(obj)
            change.nodes = True
        else:
            self._raw[key] = obj
            self._others[key] = obj
            change.objects = True

    def _delete(self, key: Key, change: Change) -> None:
        if self._raw.pop(key, None) is None:
            return
        kind, namespace, name = key
        if kind == "Namespace":
            self._set_namespace(name, None, {}, change)
        elif kind == "Pod":
            self._pods_in.get(namespace, set()).discard(name)
            self._set_pod(namespace, name, None, change)
        elif kind == "Service":
            self._set_service(namespace, name, None, change)
        elif kind == "EndpointSlice":
            self._set_slice(f"{namespace}/{name}", None, change)
        elif kind == "Node":
            self._nodes.pop(name, None)
            change.nodes = True
        else:
            self._others.pop(key, None)
            change.objects = True

    def _set_namespace(self, name: str, labels: dict[str, str] | None, annotations: dict[str, str],
                       change: Change) -> None:
        old_labels, old_annotations = self._ns_labels.get(name), self._ns_annotations.get(name, {})
        if labels is None:
            self._ns_labels.pop(name, None)
            self._ns_annotations.pop(name, None)
        else:
            self._ns_labels[name], self._ns_annotations[name] = labels, annotations
        change.namespaces.add(name)
        if (old_labels or {}).get(DATAPLANE_MODE) != (labels or {}).get(DATAPLANE_MODE):
            for pod in sorted(self._pods_in.get(name, ())):  # enrollment follows the namespace
                raw = self._raw.get(("Pod", name, pod))
                if raw is not None:
                    self._set_pod(name, pod, convert.pod_workload(raw, labels or {}), change)
        if old_annotations != annotations:  # traffic distribution may come from the namespace
            for svc in sorted(self._services_in.get(name, ())):
                raw = self._raw.get(("Service", name, svc))
                if raw is not None:
                    self._set_service(name, svc, convert.service(raw, annotations), change)

    def _set_pod(self, namespace: str, name: str, workload: Workload | None, change: Change) -> None:
        old_uid = self._pod_uid.get((namespace, name))
        old = self._workloads.get(old_uid) if old_uid is not None else None
        if old == workload:
            return
        if old is not None:
            del self._workloads[old.uid]
            del self._pod_uid[(namespace, name)]
            for ip in old.ips:
                self._claim(ip, old.uid, add=False)
            change.workloads[old.uid] = None
            change.removed[old.uid] = old
        if workload is not None:
            if workload.uid in self._workloads:  # the same uid under another name: not a Kubernetes pod
                raise ObjectError(f"Pod {namespace}/{name}: metadata.uid {workload.uid} is also "
                                  f"{self._workloads[workload.uid].key}'s")
            self._workloads[workload.uid] = workload
            self._pod_uid[(namespace, name)] = workload.uid
            for ip in workload.ips:
                self._claim(ip, workload.uid, add=True)
            change.workloads[workload.uid] = workload
            change.removed.pop(workload.uid, None)
        self._refresh_selected(namespace, old, workload, change)

    def _claim(self, ip: str, uid: str, add: bool) -> None:
        claims = self._claims.setdefault(ip, set())
        (claims.add if add else claims.discard)(uid)
        if not claims:
            del self._claims[ip]
            self._by_ip.pop(ip, None)
            return
        if len(claims) > 1:
            log.warning("pods %s all claim %s; the newest holds it",
                        ", ".join(sorted(self._workloads[u].key for u in claims)), ip)
        self._by_ip[ip] = max((self._workloads[u] for u in claims), key=lambda w: (w.created, w.uid))

    def _refresh_selected(self, namespace: str, old: Workload | None, new: Workload | None, change: Change) -> None:
        """Recompute the endpoints of the Services in ``namespace`` whose selector picks the pod, before or now."""
        for name in self._services_in.get(namespace, ()):
            svc = self._services[f"{namespace}/{name}"]
            if svc.selector is not None and any(
                    w is not None and _selects(svc.selector, w.labels) for w in (old, new)):
                self._compute_endpoints(svc, change)

    def _set_service(self, namespace: str, name: str, svc: Service | None, change: Change) -> None:
        key = f"{namespace}/{name}"
        old = self._services.get(key)
        if old == svc:
            return
        if old is not None:
            for vip in old.vips:
                rest = tuple(k for k in self._vips.get(vip, ()) if k != key)
                if rest:
                    self._vips[vip] = rest
                else:
                    self._vips.pop(vip, None)
            self._hostnames.pop(old.hostname, None)
            del self._services[key]
            self._services_in[namespace].discard(name)
            self._endpoints.pop(key, None)
        change.services.add(key)
        if svc is None:
            return
        self._services[key] = svc
        self._services_in.setdefault(namespace, set()).add(name)
        for vip in svc.vips:
            self._vips[vip] = (*self._vips.get(vip, ()), key)
        self._hostnames[svc.hostname] = key
        self._compute_endpoints(svc, change)

    def _set_slice(self, key: str, eps: SliceEndpoints | None, change: Change) -> None:
        old = self._slices.pop(key, None)
        if old is not None:
            self._slices_of.get(f"{old.namespace}/{old.service}", set()).discard(key)
        if eps is not None:
            self._slices[key] = eps
            self._slices_of.setdefault(f"{eps.namespace}/{eps.service}", set()).add(key)
        for svc_key in {f"{s.namespace}/{s.service}" for s in (old, eps) if s is not None}:
            svc = self._services.get(svc_key)
            if svc is not None and svc.selector is None:
                self._compute_endpoints(svc, change)

    def _compute_endpoints(self, svc: Service, change: Change) -> None:
        endpoints: dict[str, Endpoint] = {}
        if svc.selector is not None:
            for name in self._pods_in.get(svc.namespace, ()):
                uid = self._pod_uid.get((svc.namespace, name))
                w = self._workloads.get(uid) if uid is not None else None
                if w is None or not _selects(svc.selector, w.labels) or not (w.ready or svc.publish_not_ready):
                    continue
                ports = {p.port: (w.ports.get(p.target_name, 0) if p.target_name else p.target_port)
                         for p in svc.ports}
                endpoints[w.ip] = Endpoint(w.ip, w.node, {s: t for s, t in ports.items() if t}, w.ready)
        else:
            for slice_key in sorted(self._slices_of.get(svc.key, ())):
                eps = self._slices[slice_key]
                for ip, node, ready in eps.endpoints:
                    if not (ready or svc.publish_not_ready):
                        continue
                    ports = {p.port: eps.ports[p.name] for p in svc.ports if p.name in eps.ports}
                    if not ports and len(eps.ports) == 1 and len(svc.ports) == 1:  # one unnamed port each
                        ports = {svc.ports[0].port: next(iter(eps.ports.values()))}
                    endpoints[ip] = Endpoint(ip, node, ports, ready)
        if self._endpoints.get(svc.key) != endpoints:
            self._endpoints[svc.key] = endpoints
            change.services.add(svc.key)

    def _publish(self, change: Change) -> None:
        old = self.state
        self.state = MeshState(
            namespaces=dict(self._ns_labels) if change.namespaces else old.namespaces,
            workloads=dict(self._by_ip) if change.workloads else old.workloads,
            by_uid=dict(self._workloads) if change.workloads else old.by_uid,
            services=dict(self._services) if change.services else old.services,
            vips=dict(self._vips) if change.services else old.vips,
            hostnames=dict(self._hostnames) if change.services else old.hostnames,
            services_in={ns: frozenset(f"{ns}/{n}" for n in names) for ns, names in self._services_in.items()}
            if change.services else old.services_in,
            endpoints=dict(self._endpoints) if change.services else old.endpoints,
            nodes=dict(self._nodes) if change.nodes else old.nodes,
            objects=tuple(self._others.values()) if change.objects else old.objects)
        for subscriber in self._subscribers:
            try:
                subscriber(self.state, change)
            except Exception:
                log.exception("mesh store subscriber %r failed", subscriber)



def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def build_state(objects: Iterable[Any]) -> MeshState:
    """A snapshot from Kubernetes objects; the first object the mesh cannot take raises ``ObjectError``."""
    store = MeshStore()
    items = list(objects)
    # Namespaces first, so that pods are converted knowing their namespace's labels (as one apply would).
    items.sort(key=lambda o: 0 if isinstance(o, Mapping) and o.get("kind") == "Namespace" else 1)
    for obj in items:
        errors = store.apply([obj])
        if errors:
            raise errors[0]
    if len(store.state.workloads) < sum(len(w.ips) for w in store.state.by_uid.values()):
        taken: dict[str, str] = {}
        for w in store.state.by_uid.values():
            for ip in w.ips:
                if ip in taken:
                    raise ObjectError(f"Pod {w.key}: status.podIP {ip} is also {taken[ip]}'s")
                taken[ip] = w.key
    return store.state
