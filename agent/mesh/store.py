"""The agent's store of the mesh: typed snapshots with indexes, updated by deltas.

A source (the lab's state file, or Kubernetes informers) hands the store object events; the store converts
only what changed, updates its indexes, and publishes a new ``MeshState``. A snapshot is never modified
after it is published: readers on the data path (and the kernel and telemetry threads) hold one snapshot
and never see half an update. The indexes are copy-on-write maps (``cowmap``): a new snapshot shares with
the previous one every shard the change did not touch; pods and selector Services are indexed by label. So
a pod event costs work proportional to that pod, its node and the Services selecting it, and a Service event
to the pods it selects, never a walk, a rebuild or a copy of the world (nor of a big namespace).
Subscribers are told what changed (``Change``).

Endpoints follow istiod's ambient rules: a Service with a selector has the Running pods of its namespace
that match it, healthy (Ready, not being deleted) unless ``publishNotReadyAddresses``; a named target port
is resolved per pod from its container ports and a pod without that name serves nothing on that port; a
Service without a selector takes its EndpointSlices' addresses. Endpoints are addresses, as in EndpointSlices:
a selected pod is one endpoint per address of a family the Service has (``spec.ipFamilies``), so a dual-stack
pod of a dual-stack Service is two. Workloads are found by every address of ``status.podIPs``. Two pods claiming
one IP: the newest holds it, in the IP index and as a Service's endpoint at that address.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from agent.mesh import convert
from agent.mesh.convert import ObjectError
from agent.mesh.cowmap import CowMap
from agent.mesh.model import (
    AMBIENT,
    DATAPLANE_MODE,
    NONE,
    Endpoint,
    Node,
    Service,
    SliceEndpoints,
    Workload,
    ip_family,
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
    by_node: Mapping[str, frozenset[str]] = field(default_factory=dict)  # node -> uids of its workloads
    services: Mapping[str, Service] = field(default_factory=dict)  # by "ns/name"
    vips: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # VIP -> service keys
    hostnames: Mapping[str, str] = field(default_factory=dict)  # FQDN -> service key
    services_in: Mapping[str, frozenset[str]] = field(default_factory=dict)  # namespace -> service keys
    serving_at: Mapping[str, frozenset[str]] = field(default_factory=dict)  # endpoint IP -> service keys
    endpoints: Mapping[str, Mapping[str, Endpoint]] = field(default_factory=dict)  # service key -> ip -> endpoint
    nodes: Mapping[str, Node] = field(default_factory=dict)
    objects: tuple[Mapping[str, Any], ...] = ()  # everything else (policies), for their own parsers

    def by_ip(self, ip: str) -> Workload | None:
        return self.workloads.get(ip)

    def on_node(self, node: str) -> list[Workload]:
        return [self.by_uid[uid] for uid in self.by_node.get(node, ())]

    def service_at(self, vip: str, port: int, client_namespace: str = "") -> Service | None:
        """The Service with ``vip``:``port`` (the client's namespace first when several share the VIP)."""
        keys = self.vips.get(vip, ())
        found = [s for k in keys if (s := self.services.get(k)) is not None and s.port(port) is not None]
        if not found:
            return None
        return next((s for s in found if s.namespace == client_namespace), found[0])

    def service_called(self, original: tuple[str, int], endpoint_ip: str) -> Service | None:
        """The Service a connection was opened to, from its destination before the DNAT that took it to
        ``endpoint_ip``: a VIP:port, else a node port (on any node address or load-balancer IP) of a Service that
        ``endpoint_ip`` serves."""
        service = self.service_at(*original)
        if service is not None:
            return service
        for key in sorted(self.serving_at.get(endpoint_ip, ())):
            found = self.services[key]
            if any(p.node_port == original[1] for p in found.ports):
                return found
        return None

    def service_serving(self, ip: str, port: int) -> Service | None:
        """A Service whose endpoint ``ip`` serves target ``port`` (ztunnel's guess of the Service of an inbound
        connection that did not name one); the first by name when several do."""
        for key in sorted(self.serving_at.get(ip, ())):
            endpoint = self.endpoints[key][ip]
            if port in endpoint.ports.values():
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
        # published (copy-on-write: each snapshot takes them as they are, a later write copies a shard)
        self._ns_labels: CowMap[str, dict[str, str]] = CowMap(8)
        self._workloads: CowMap[str, Workload] = CowMap()  # uid -> workload
        self._by_ip: CowMap[str, Workload] = CowMap()
        self._by_node: CowMap[str, frozenset[str]] = CowMap(16)
        self._services: CowMap[str, Service] = CowMap()
        self._vips: CowMap[str, tuple[str, ...]] = CowMap()
        self._hostnames: CowMap[str, str] = CowMap()
        self._service_keys_in: CowMap[str, frozenset[str]] = CowMap(16)  # namespace -> its Services' keys
        self._endpoints: CowMap[str, Mapping[str, Endpoint]] = CowMap()  # each value is replaced, never changed
        self._serving_at: CowMap[str, frozenset[str]] = CowMap()  # endpoint IP -> service keys (_set_endpoints)
        self._nodes: CowMap[str, Node] = CowMap(8)
        # the store's own
        self._ns_annotations: dict[str, dict[str, str]] = {}
        self._pods_in: dict[str, set[str]] = {}  # namespace -> pod names (with or without a workload)
        self._pod_uid: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid of its workload
        self._pods_labelled = _LabelIndex()  # pods with a workload, under each of their labels
        self._claims: dict[str, set[str]] = {}  # ip -> uids claiming it
        self._services_in: dict[str, set[str]] = {}  # namespace -> service names
        self._selectors = _LabelIndex()  # Services with a selector, under one label of it (_anchor)
        self._slices: dict[str, SliceEndpoints] = {}  # slice key -> slice
        self._slices_of: dict[str, set[str]] = {}  # service key -> slice keys
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
            if _same(self._raw.get(key), obj, key[0]):
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
            typed = convert.node(obj)
            self._raw[key] = obj
            if self._nodes.get(name) != typed:
                self._nodes[name] = typed
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
        if (old_labels, old_annotations) == (labels, annotations):
            return  # another field of the Namespace: nothing the mesh reads
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
        other = self._workloads.get(workload.uid) if workload is not None else None
        if workload is not None and other is not None and other is not old:
            # the same uid under another name: not a Kubernetes pod. Checked before anything changes, so that
            # the caller's removal of this pod's previous version finds it whole (endpoints included).
            raise ObjectError(f"Pod {namespace}/{name}: metadata.uid {workload.uid} is also {other.key}'s")
        if old is not None:
            del self._workloads[old.uid]
            del self._pod_uid[(namespace, name)]
            self._pods_labelled.remove(namespace, name, old.labels.items())
            for ip in old.ips:
                self._claim(ip, old.uid, add=False)
            change.workloads[old.uid] = None
            change.removed[old.uid] = old
        if workload is not None:
            self._workloads[workload.uid] = workload
            self._pod_uid[(namespace, name)] = workload.uid
            self._pods_labelled.add(namespace, name, workload.labels.items())
            for ip in workload.ips:
                self._claim(ip, workload.uid, add=True)
            change.workloads[workload.uid] = workload
            change.removed.pop(workload.uid, None)
        self._place(old, workload)
        self._refresh_selected(namespace, old, workload, change)

    def _place(self, old: Workload | None, new: Workload | None) -> None:
        """Keep the index by node (uids: a pod changing in place leaves it alone)."""
        if old is not None and new is not None and (old.node, old.uid) == (new.node, new.uid):
            return
        if old is not None:
            rest = self._by_node[old.node] - {old.uid}
            if rest:
                self._by_node[old.node] = rest
            else:
                del self._by_node[old.node]
        if new is not None:
            self._by_node[new.node] = self._by_node.get(new.node, frozenset()) | {new.uid}

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
        self._by_ip[ip] = max((self._workloads[u] for u in claims), key=_age)

    def _refresh_selected(self, namespace: str, old: Workload | None, new: Workload | None, change: Change) -> None:
        """Update, in the Services of ``namespace`` whose selector picks the pod before or now, the endpoints at
        the pod's old and new address (an endpoint depends only on the pods claiming its address)."""
        ips = {ip for w in (old, new) if w is not None for ip in w.ips}
        candidates: set[str] = set()  # the Services anchored on one of the pod's labels, before or now
        for w in (old, new):
            if w is not None:
                for label, value in w.labels.items():
                    candidates.update(self._selectors.names(namespace, label, value))
        for name in candidates:
            svc = self._services[f"{namespace}/{name}"]
            selector = svc.selector
            if selector is None or not any(w is not None and _selects(selector, w.labels) for w in (old, new)):
                continue
            current = self._endpoints.get(svc.key, {})
            updated: dict[str, Endpoint] | None = None
            for ip in ips:
                endpoint = self._endpoint_at(svc, ip)
                if current.get(ip) != endpoint:
                    updated = dict(current) if updated is None else updated
                    if endpoint is None:
                        del updated[ip]
                    else:
                        updated[ip] = endpoint
            if updated is not None:
                self._set_endpoints(svc.key, updated)
                change.services.add(svc.key)

    def _endpoint_at(self, svc: Service, ip: str) -> Endpoint | None:
        """The endpoint of selector Service ``svc`` at ``ip``: the newest pod there that it takes, if any."""
        if ip_family(ip) not in svc.families:
            return None
        chosen: Workload | None = None
        for uid in self._claims.get(ip, ()):
            w = self._workloads[uid]
            if _takes(svc, w) and (chosen is None or _age(w) > _age(chosen)):
                chosen = w
        return _endpoint(svc, chosen, ip) if chosen is not None else None

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
            if old.selector:
                self._selectors.remove(namespace, name, [_anchor(old.selector)])
            self._set_endpoints(key, None)
        change.services.add(key)
        if svc is None:
            keys = self._service_keys_in[namespace] - {key}
            if keys:
                self._service_keys_in[namespace] = keys
            else:
                del self._service_keys_in[namespace]
            return
        self._services[key] = svc
        self._services_in.setdefault(namespace, set()).add(name)
        if old is None:
            self._service_keys_in[namespace] = self._service_keys_in.get(namespace, frozenset()) | {key}
        if svc.selector:
            self._selectors.add(namespace, name, [_anchor(svc.selector)])
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
            chosen: dict[str, Workload] = {}  # ip -> the newest pod there the Service takes
            # only the pods carrying the selector's rarest label can match
            pods = min((self._pods_labelled.names(svc.namespace, k, v) for k, v in svc.selector.items()), key=len)
            for name in pods:
                uid = self._pod_uid.get((svc.namespace, name))
                w = self._workloads.get(uid) if uid is not None else None
                if w is None or not _takes(svc, w):
                    continue
                for ip in w.ips:
                    if ip_family(ip) in svc.families and (ip not in chosen or _age(w) > _age(chosen[ip])):
                        chosen[ip] = w
            endpoints = {ip: _endpoint(svc, w, ip) for ip, w in chosen.items()}
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
            self._set_endpoints(svc.key, endpoints)
            change.services.add(svc.key)

    def _set_endpoints(self, key: str, endpoints: Mapping[str, Endpoint] | None) -> None:
        """The one writer of a Service's endpoints (None: the Service is gone), keeping the by-IP index."""
        before = set(self._endpoints.get(key, {}))
        after = set(endpoints or ())
        if endpoints is None:
            self._endpoints.pop(key, None)
        else:
            self._endpoints[key] = endpoints
        for ip in before - after:
            rest = self._serving_at[ip] - {key}
            if rest:
                self._serving_at[ip] = rest
            else:
                del self._serving_at[ip]
        for ip in after - before:
            self._serving_at[ip] = self._serving_at.get(ip, frozenset()) | {key}

    def _publish(self, change: Change) -> None:
        self.state = MeshState(
            namespaces=self._ns_labels.snapshot(), workloads=self._by_ip.snapshot(),
            by_uid=self._workloads.snapshot(), by_node=self._by_node.snapshot(), services=self._services.snapshot(),
            vips=self._vips.snapshot(), hostnames=self._hostnames.snapshot(),
            services_in=self._service_keys_in.snapshot(), endpoints=self._endpoints.snapshot(),
            serving_at=self._serving_at.snapshot(),
            nodes=self._nodes.snapshot(),
            objects=tuple(self._others.values()) if change.objects else self.state.objects)
        for subscriber in self._subscribers:
            try:
                subscriber(self.state, change)
            except Exception:
                log.exception("mesh store subscriber %r failed", subscriber)



class _LabelIndex:
    """(namespace, label, value) -> the names of the objects indexed under that pair."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, str, str], set[str]] = {}

    def add(self, namespace: str, name: str, pairs: Iterable[tuple[str, str]]) -> None:
        for label, value in pairs:
            self._names.setdefault((namespace, label, value), set()).add(name)

    def remove(self, namespace: str, name: str, pairs: Iterable[tuple[str, str]]) -> None:
        for label, value in pairs:
            names = self._names[(namespace, label, value)]
            names.discard(name)
            if not names:
                del self._names[(namespace, label, value)]

    def names(self, namespace: str, label: str, value: str) -> Set[str]:
        return self._names.get((namespace, label, value), _NONE)


_NONE: frozenset[str] = frozenset()


def _anchor(selector: Mapping[str, str]) -> tuple[str, str]:
    """The label a Service is indexed under: any of its selector's would do (a pod lacking it is not selected)."""
    return min(selector.items())


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _takes(svc: Service, w: Workload) -> bool:
    """Whether selector Service ``svc`` has pod ``w`` as an endpoint (healthy, unless not-ready ones are
    published)."""
    return (w.namespace == svc.namespace and svc.selector is not None and _selects(svc.selector, w.labels)
            and (w.ready or svc.publish_not_ready))


def _endpoint(svc: Service, w: Workload, ip: str) -> Endpoint:
    """Pod ``w`` at its address ``ip`` as an endpoint of ``svc``."""
    ports = {p.port: (w.ports.get(p.target_name, 0) if p.target_name else p.target_port) for p in svc.ports}
    return Endpoint(ip, w.node, {s: t for s, t in ports.items() if t}, w.ready)


def _age(w: Workload) -> tuple[str, str]:
    """Orders pods claiming one address: the newest (then the greatest uid, to be deterministic) holds it."""
    return w.created, w.uid


def build_state(objects: Iterable[Any]) -> MeshState:
    """A snapshot from Kubernetes objects; the first object the mesh cannot take raises ``ObjectError``."""
    store = MeshStore()
    items = list(objects)
    # Namespaces first, so that pods are converted knowing their namespace's labels (re-enrolling them later
    # would cost a second conversion). One apply: one snapshot, published once.
    items.sort(key=lambda o: 0 if isinstance(o, Mapping) and o.get("kind") == "Namespace" else 1)
    errors = store.apply(items)
    if errors:
        raise errors[0]
    if len(store.state.workloads) < sum(len(w.ips) for w in store.state.by_uid.values()):
        taken: dict[str, str] = {}
        for w in sorted(store.state.by_uid.values(), key=lambda w: w.key):
            for ip in w.ips:
                if ip in taken:
                    raise ObjectError(f"Pod {w.key}: status.podIPs: {ip} is also {taken[ip]}'s")
                taken[ip] = w.key
    return store.state


_VOLATILE_METADATA = ("resourceVersion", "generation", "managedFields")


def _same(old: Mapping[str, Any] | None, new: Mapping[str, Any], kind: str) -> bool:
    """Whether an object's new version changes nothing the mesh reads. For the kinds read raw (policies) a status
    write (Istio writes one on policies) or a new resourceVersion is no change: the engine need not parse
    them all again."""
    if old is None or old == new:
        return old is not None
    if kind in TYPED_KINDS:
        return False
    return _meaningful(old) == _meaningful(new)


def _meaningful(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    kept = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
    if isinstance(meta, Mapping):
        kept["metadata"] = {k: v for k, v in meta.items() if k not in _VOLATILE_METADATA}
    return kept
