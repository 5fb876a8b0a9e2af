"""The agent's view of the cluster: namespaces, workloads, and which workloads are enrolled in the mesh.

One store, fed by a source: the lab's state file (``StateFile``), or Kubernetes informers. Every update
replaces the whole ``ClusterState`` snapshot (immutable, so readers on the data path never see half an
update) and tells subscribers what it replaced.

Enrollment follows Istio ambient exactly: ``istio.io/dataplane-mode=ambient`` on the pod or its
namespace enrolls it; ``istio.io/dataplane-mode=none`` on the pod opts it out (any other pod value
leaves the decision to the namespace); pods with a sidecar and hostNetwork pods are never captured.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.objectfile import SourceError, WatchedFile, kubernetes_objects
from hbone import SpiffeId

log = logging.getLogger(__name__)

DATAPLANE_MODE = "istio.io/dataplane-mode"
AMBIENT = "ambient"
NONE = "none"
SIDECAR_STATUS = "sidecar.istio.io/status"


@dataclass(frozen=True, slots=True)
class Workload:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    service_account: str
    labels: Mapping[str, str]
    enrolled: bool

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ClusterState:
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # name -> labels
    workloads: Mapping[str, Workload] = field(default_factory=dict)  # by pod IP
    objects: tuple[Mapping[str, Any], ...] = ()  # everything else (policies), for their own parsers

    def by_ip(self, ip: str) -> Workload | None:
        return self.workloads.get(ip)

    def on_node(self, node: str) -> list[Workload]:
        return [w for w in self.workloads.values() if w.node == node]


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


def _labels(meta: Mapping[str, Any], where: str) -> dict[str, str]:
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise ValueError(f"{where}: metadata.labels must map strings to strings")
    return labels


def build_state(objects: Iterable[Any]) -> ClusterState:
    """A snapshot from Kubernetes objects; an invalid Namespace or Pod raises naming it and the field."""
    namespaces: dict[str, dict[str, str]] = {}
    pods: list[Mapping[str, Any]] = []
    others: list[Mapping[str, Any]] = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise ValueError("every item must be a Kubernetes object (a mapping)")
        kind, meta = obj.get("kind"), obj.get("metadata") or {}
        if kind == "Namespace":
            namespaces[str(meta.get("name"))] = _labels(meta, f"Namespace {meta.get('name')}")
        elif kind == "Pod":
            pods.append(obj)
        else:
            others.append(obj)
    workloads: dict[str, Workload] = {}
    for pod in pods:
        meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
        namespace = str(meta.get("namespace") or "default")
        where = f"Pod {namespace}/{meta.get('name')}"
        ip, node = status.get("podIP"), spec.get("nodeName")
        if not ip or not node or status.get("phase", "Running") != "Running" or spec.get("hostNetwork"):
            continue  # not running, not scheduled, or no address of its own: nothing to capture
        if ip in workloads:
            raise ValueError(f"{where}: status.podIP {ip} is also {workloads[ip].key}'s")
        workloads[ip] = Workload(
            namespace=namespace, name=str(meta.get("name")), node=str(node), ip=str(ip),
            uid=str(meta.get("uid") or f"{namespace}/{meta.get('name')}"),
            service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
            labels=_labels(meta, where), enrolled=enrolled(pod, namespaces.get(namespace, {})))
    return ClusterState(namespaces, workloads, tuple(others))


Subscriber = Callable[[ClusterState, ClusterState], None]  # (old, new)


class WorkloadStore:
    def __init__(self) -> None:
        self.state = ClusterState()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def replace(self, state: ClusterState) -> None:
        old, self.state = self.state, state
        for subscriber in self._subscribers:
            try:
                subscriber(old, state)
            except Exception:
                log.exception("state subscriber %r failed", subscriber)


class StateFile:
    """Feeds a store from the lab's state file (Kubernetes objects), re-read whenever it changes.

    A file that cannot be read or parsed is reported and the last good state stays in force.
    """

    def __init__(self, path: Path, store: WorkloadStore, interval: float = 0.1) -> None:
        self._file = WatchedFile(path, lambda data: build_state(kubernetes_objects(data)), "cluster state")
        self.store = store
        self.interval = interval

    def load(self) -> None:
        state = self._file.get()
        if state is not self.store.state:
            self.store.replace(state)

    async def watch(self) -> None:
        while True:
            try:
                self.load()
            except SourceError as e:
                log.error("%s", e)
            await asyncio.sleep(self.interval)
