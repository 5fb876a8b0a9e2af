"""The lab's cluster state: the Kubernetes objects that the agents and the CA read, kept in one YAML file.

The file is the lab's API server. Its format is the contract with the agent and the CA::

    apiVersion: v1
    kind: List
    items:                      # Namespace and Pod objects (v1), later also Istio policies
    - {apiVersion: v1, kind: Namespace, metadata: {name, labels}}
    - {apiVersion: v1, kind: Pod,
       metadata: {name, namespace, labels, uid},
       spec: {nodeName, serviceAccountName, hostNetwork: false,
              containers: [...]},   # once a Pod is applied (agent/lab/pods.py): ports, probes
       status: {podIP, podIPs: [{ip}, ...], hostIP, phase: Running}}

Objects are identified the way the API server identifies them: (kind, namespace, name), with no
namespace for cluster-scoped kinds. Changes are made like kubectl makes them (``label`` with the same
rules and messages; ``put``/``remove`` are what ``apply``/``delete`` need) inside ``edit()``, which holds
an exclusive lock for the read-modify-write and lands the new file with one rename: a reader sees the old
file or the new one, never a mix. The rename gives the file a new inode, so a watcher must re-stat the
path (or watch the directory), not keep a watch on the old inode.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from agent.mesh.store import enrolled
from agent.sources.objectfile import kubernetes_objects

ROOT_NAMESPACE = "istio-system"  # Istio's root namespace: its policies apply mesh-wide
CLUSTER_SCOPED = frozenset({"Namespace", "Node", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")

ObjectKey = tuple[str, str, str]  # (kind, namespace or "" for cluster-scoped kinds, name)
LabelChange = tuple[str, str | None]  # (key, new value) or (key, None) to remove


class StateError(Exception):
    """A change that cannot be made; the message is meant for the user (kubectl-like)."""


class NotFound(StateError):
    """The object to change does not exist."""


# -- names and labels -----------------------------------------------------------------------------------
def check_dns_label(name: str, what: str) -> str:
    """`name` if it is a valid DNS-1123 label (namespace and pod-name rules), else StateError."""
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise StateError(f"invalid {what} {name!r}: must be a DNS-1123 label (a-z, 0-9, '-', at most 63)")
    return name


def check_label_key(key: str) -> str:
    """Validate a label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise StateError(f"invalid label key {key!r}: prefix must be a DNS subdomain")
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        raise StateError(f"invalid label key {key!r}: name must be 1-63 of [A-Za-z0-9-_.], alphanumeric at both ends")
    return key


def check_label_value(key: str, value: str) -> str:
    """Validate a label value: empty, or at most 63 of [A-Za-z0-9-_.] starting and ending alphanumeric."""
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        raise StateError(f"invalid value {value!r} for label {key!r}: at most 63 of [A-Za-z0-9-_.], "
                         "alphanumeric at both ends")
    return value


def parse_label_changes(args: Sequence[str]) -> list[LabelChange]:
    """kubectl's label arguments: ``key=value`` sets, ``key-`` removes."""
    if not args:
        raise StateError("at least one label update is required (key=value or key-)")
    changes: list[LabelChange] = []
    for arg in args:
        if "=" in arg:
            key, value = arg.split("=", 1)
            changes.append((check_label_key(key), check_label_value(key, value)))
        elif arg.endswith("-"):
            changes.append((check_label_key(arg[:-1]), None))
        else:
            raise StateError(f"invalid label update {arg!r}: expected key=value or key-")
    keys = [k for k, _ in changes]
    if dup := {k for k in keys if keys.count(k) > 1}:
        raise StateError(f"label {sorted(dup)[0]!r} is given more than once")
    return changes


# -- objects ----------------------------------------------------------------------------------------------
def namespace_object(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A v1 Namespace."""
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": check_dns_label(name, "namespace name"), "labels": dict(labels or {})}}


def pod_object(*, namespace: str, name: str, uid: str, node: str, pod_ips: Sequence[str], host_ip: str,
               service_account: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A running v1 Pod scheduled on `node` (the fields the agent and the CA read, nothing else). ``pod_ips``:
    its addresses, the primary first (``status.podIP`` is the primary, ``status.podIPs`` all of them, as the
    kubelet reports a dual-stack pod)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": check_dns_label(name, "pod name"), "namespace": check_dns_label(namespace, "namespace"),
                     "labels": dict(labels or {}), "uid": uid},
        "spec": {"nodeName": node, "serviceAccountName": service_account, "hostNetwork": False},
        "status": {"podIP": pod_ips[0], "podIPs": [{"ip": ip} for ip in pod_ips], "hostIP": host_ip,
                   "phase": "Running"},
    }


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    """(kind, namespace, name) of an object; a namespaced object without a namespace is in "default" (as
    kubectl applies it), one given must be a non-empty string."""
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise StateError(f"an object without a kind: kind must be a non-empty string, not {_short(kind)}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        raise StateError(f"{_short(kind)}: metadata must be a mapping, not {_short(meta)}")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise StateError(f"{_short(kind)}: metadata.name must be a non-empty string, not {_short(name)}")
    if kind in CLUSTER_SCOPED:
        return kind, "", name
    namespace = meta.get("namespace")
    if namespace is None:
        return kind, "default", name
    if not isinstance(namespace, str) or not namespace:
        raise StateError(f"{_short(kind)} {_short(name)}: metadata.namespace must be a non-empty string, "
                         f"not {_short(namespace)}")
    return kind, namespace, name


def _short(value: Any) -> str:
    """``value`` for a message: strings as they are, anything else by type, at most 60 characters."""
    text = value if isinstance(value, str) else f"a {type(value).__name__}" if value is not None else "null"
    return text if len(text) <= 60 else text[:57] + "..."


def describe(key: ObjectKey) -> str:
    """An object as kubectl's errors name it: ``pods "web"`` (plus the namespace)."""
    kind, namespace, name = key
    plural = kind.lower()[:-1] + "ies" if kind.endswith("y") else kind.lower() + "s"
    return f'{plural} "{name}"' + (f' in namespace "{namespace}"' if namespace else "")


# -- the state ----------------------------------------------------------------------------------------------
class LabObjects:
    """The objects of a state file, in file order, addressable by (kind, namespace, name)."""

    def __init__(self, objects: Iterable[Mapping[str, Any]] = ()) -> None:
        self._objects: dict[ObjectKey, dict[str, Any]] = {}
        for obj in objects:
            key = object_key(obj)
            if key in self._objects:
                raise StateError(f"{describe(key)} is in the state twice")
            self._objects[key] = copy.deepcopy(dict(obj))

    @classmethod
    def parse(cls, data: bytes | str) -> LabObjects:
        """Parse a YAML stream of objects (a ``kind: List`` or several documents)."""
        raw = data.encode() if isinstance(data, str) else data
        try:
            objects = list(kubernetes_objects(raw))  # mappings, or ObjectError naming the document
        except ValueError as e:
            raise StateError(f"cannot parse cluster state: {e}") from None
        return cls(objects)

    @classmethod
    def load(cls, path: Path) -> LabObjects:
        """Read a state file."""
        return cls.parse(path.read_bytes())

    def dump(self) -> str:
        """The file text: one ``kind: List``, keys in insertion order (metadata before spec)."""
        doc = {"apiVersion": "v1", "kind": "List", "items": list(self._objects.values())}
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)

    def save(self, path: Path) -> None:
        """Write atomically (see `atomic_write`)."""
        atomic_write(path, self.dump().encode(), mode=0o644)

    # -- access -------------------------------------------------------------------------------------------
    @property
    def objects(self) -> list[dict[str, Any]]:
        """Copies of all objects, in file order."""
        return copy.deepcopy(list(self._objects.values()))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """Copies of the objects of one kind, in file order."""
        return [copy.deepcopy(o) for (k, _, _), o in self._objects.items() if k == kind]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A copy of one object, or None."""
        obj = self._objects.get((kind, "" if kind in CLUSTER_SCOPED else namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        """Labels of a Namespace ({} when it has none or does not exist)."""
        ns = self.get("Namespace", "", namespace)
        return dict((ns or {}).get("metadata", {}).get("labels") or {})

    def is_enrolled(self, pod: Mapping[str, Any]) -> bool:
        """`enrolled()` with the pod's namespace from this state."""
        return enrolled(pod, self.namespace_labels(object_key(pod)[1]))

    # -- changes --------------------------------------------------------------------------------------------
    def put(self, obj: Mapping[str, Any]) -> str:
        """Create or replace an object (kubectl apply without field merging); returns "created",
        "configured" or "unchanged". A namespaced object needs its Namespace to exist, as in a cluster."""
        key = object_key(obj)
        namespace = key[1]
        if namespace and ("Namespace", "", namespace) not in self._objects:
            raise NotFound(f'namespaces "{namespace}" not found')
        new = copy.deepcopy(dict(obj))
        new.setdefault("metadata", {})
        if namespace:
            new["metadata"]["namespace"] = namespace
        old = self._objects.get(key)
        if old == new:
            return "unchanged"
        self._objects[key] = new
        return "configured" if old is not None else "created"

    def remove(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """Delete an object (a Namespace takes its objects with it, as in a cluster); returns it."""
        key: ObjectKey = (kind, "" if kind in CLUSTER_SCOPED else namespace, name)
        obj = self._objects.pop(key, None)
        if obj is None:
            raise NotFound(f"{describe(key)} not found")
        if kind == "Namespace":
            for other in [k for k in self._objects if k[1] == name]:
                del self._objects[other]
        return obj

    def label(self, kind: str, namespace: str, name: str, changes: Sequence[LabelChange],
              overwrite: bool = False) -> str:
        """Change an object's labels as ``kubectl label`` does: setting a label that already has another
        value needs `overwrite`; removing an absent label is not an error. Returns kubectl's message."""
        key: ObjectKey = (kind, "" if kind in CLUSTER_SCOPED else namespace, name)
        obj = self._objects.get(key)
        if obj is None:
            raise NotFound(f"{describe(key)} not found")
        meta = obj.setdefault("metadata", {})
        labels: dict[str, str] = dict(meta.get("labels") or {})
        before = dict(labels)
        notes: list[str] = []
        for label_key, value in changes:
            if value is None:
                if labels.pop(label_key, None) is None:
                    notes.append(f'label "{label_key}" not found.')
            elif labels.get(label_key, value) != value and not overwrite:
                raise StateError(f"'{label_key}' already has a value ({labels[label_key]}), "
                                 "and --overwrite is false")
            else:
                labels[label_key] = value
        what = f"{kind.lower()}/{name}"
        if labels == before:
            return "\n".join([*notes, f"{what} not labeled"])
        meta["labels"] = labels
        return "\n".join([*notes, f"{what} {'unlabeled' if len(labels) < len(before) else 'labeled'}"])


# -- files ----------------------------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` in one rename (temp file in the same directory, fsynced first)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def lock_path(path: Path) -> Path:
    """The lock file that serializes edits of the state file at `path`."""
    return path.with_name(f".{path.name}.lock")


@contextmanager
def edit(path: Path, changed: Callable[[LabObjects], None] | None = None) -> Iterator[LabObjects]:
    """Read-modify-write of a state file under an exclusive lock; the file is rewritten (atomically) only
    when the body returns normally and something changed. ``changed`` is then called with the new state,
    still under the lock (so that what it derives from the state is made in the order the states were)."""
    with open(lock_path(path), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        state = LabObjects.load(path)
        before = state.dump()
        yield state
        if state.dump() != before:
            state.save(path)
            if changed is not None:
                changed(state)
