"""Kubernetes objects as the API server gives them (plain dicts), for the mesh store's tests.

Defaults make a healthy object: a Running, Ready, scheduled pod with an address; a ClusterIP Service.
Keyword arguments set what a test is about; ``**extra`` merges into ``spec`` (or the top level for slices).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Obj = dict[str, Any]
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def namespace(name: str, labels: Mapping[str, str] | None = None,
              annotations: Mapping[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "labels": dict(labels or {})}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def pod(name: str, ns: str = "default", ip: str | None = "10.0.0.1", *, node: str = "node-a",
        labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None,
        uid: str | None = None, created: str = "2026-01-01T00:00:00Z", ready: bool | None = True,
        phase: str = "Running", ports: Mapping[str, int] | None = None, ips: Sequence[str] = (),
        deleting: bool = False, **spec: Any) -> Obj:
    """``ports``: named TCP container ports; ``ready=None``: no conditions reported at all."""
    meta: Obj = {"name": name, "namespace": ns, "uid": uid or f"uid-{ns}-{name}", "labels": dict(labels or {}),
                 "creationTimestamp": created}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    container: Obj = {"name": "app", "image": "app:1"}
    if ports:
        container["ports"] = [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports.items()]
    status: Obj = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}, *({"ip": extra} for extra in ips)]
    if ready is not None:
        status["conditions"] = [{"type": "PodScheduled", "status": "True"},
                                {"type": "Ready", "status": "True" if ready else "False"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "serviceAccountName": "sa", "containers": [container], **spec},
            "status": status}


def service(name: str, ns: str = "default", vip: str | None = "10.96.0.1", *,
            selector: Mapping[str, str] | None = None, ports: Sequence[Mapping[str, Any]] | None = None,
            annotations: Mapping[str, str] | None = None, **spec: Any) -> Obj:
    """``selector=None`` makes a selector-less Service; ``ports`` default to one TCP port 80."""
    meta: Obj = {"name": name, "namespace": ns}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    body: Obj = {"ports": [dict(p) for p in ports] if ports is not None else [{"port": 80, "protocol": "TCP"}]}
    if vip is not None:
        body["clusterIP"] = vip
        body["clusterIPs"] = [vip]
    if selector is not None:
        body["selector"] = dict(selector)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {**body, **spec}}


def endpoint_slice(name: str, ns: str, service_name: str, addresses: Sequence[str], *,
                   ports: Mapping[str, int] | None = None, ready: bool | None = None, node: str = "node-a",
                   **extra: Any) -> Obj:
    """One endpoint per address; ``ready=None`` leaves ``conditions.ready`` unset."""
    conditions = {} if ready is None else {"ready": ready}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service_name}},
            "endpoints": [{"addresses": [a], "conditions": conditions, "nodeName": node} for a in addresses],
            "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in (ports or {"": 80}).items()],
            **extra}


def node(name: str, zone: str = "") -> Obj:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def policy(name: str, ns: str = "default") -> Obj:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": {"action": "ALLOW", "rules": [{}]}}


def with_meta(obj: Obj, **changes: Any) -> Obj:
    """A copy of ``obj`` with metadata fields set (e.g. ``resourceVersion``) or, when None, removed."""
    meta = {**obj["metadata"], **changes}
    return {**obj, "metadata": {k: v for k, v in meta.items() if v is not None}}
