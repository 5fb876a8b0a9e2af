"""Pods in the lab: ``ambit lab up`` makes them (each a network namespace with its own address); a Pod object
applied with ``ambit lab apply -f`` is a new version of one of them, as if its workload were rolled out again
on the same node with the same address. It carries the pod's containers (``spec.containers`` and
``spec.initContainers``: their ports and their liveness, readiness and startup probes) and any other spec
field, and its labels and annotations when it gives them (else the pod keeps its own). What the lab made is
kept: ``metadata.uid``, ``spec.nodeName``, ``spec.serviceAccountName`` (the pod's identity),
``spec.hostNetwork: false`` and ``status`` (its address); giving another value for one of them is refused, as
a field that cannot change. A Pod the lab did not make is refused: the lab cannot give it a network namespace.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from agent.lab.state import LabObjects, object_key
from agent.mesh.convert import ObjectError, pod_workload

KEPT_SPEC = ("nodeName", "serviceAccountName", "hostNetwork")  # what the lab decided when it made the pod


def admit(state: LabObjects, objects: Sequence[dict[str, Any]]) -> list[str]:
    """Complete the Pods of a batch about to be applied to ``state`` with what the lab keeps, in place, and check
    them as the agents will read them. Returns the errors, each naming the object and the field."""
    errors: list[str] = []
    for obj in objects:
        if obj.get("kind") != "Pod":
            continue
        _kind, namespace, name = object_key(obj)
        where = f"Pod {namespace}/{name}"
        try:
            current = state.get("Pod", namespace, name)
            if current is None:
                made = ", ".join(f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in state.of_kind("Pod"))
                raise ObjectError(f"{where}: not a pod of this lab: `ambit lab up` makes the pods (a network "
                                  f"namespace each), and a Pod applied changes one of them ({made or 'none'})")
            _keep(obj, current, where)
            pod_workload(obj, state.namespace_labels(namespace), problems=[])  # the agents log the probe problems
        except ObjectError as e:
            errors.append(str(e))
    return errors


def _keep(obj: dict[str, Any], current: Mapping[str, Any], where: str) -> None:
    meta, spec = obj["metadata"], obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise ObjectError(f"{where}: spec must be a mapping, not {type(spec).__name__}")
    kept_meta, kept_spec = current["metadata"], current.get("spec") or {}
    _same(meta, kept_meta, "uid", f"{where}: metadata.uid")
    for field in KEPT_SPEC:
        _same(spec, kept_spec, field, f"{where}: spec.{field}")
    if spec.get("serviceAccount") not in (None, kept_spec.get("serviceAccountName")):
        raise ObjectError(f"{where}: spec.serviceAccount: field is immutable "
                          f"({kept_spec.get('serviceAccountName')}, not {spec['serviceAccount']!r})")
    for field in ("labels", "annotations"):
        if meta.get(field) is None and kept_meta.get(field) is not None:
            meta[field] = copy.deepcopy(kept_meta[field])
    obj["status"] = copy.deepcopy(current.get("status") or {})


def _same(given: dict[str, Any], kept: Mapping[str, Any], field: str, what: str) -> None:
    """``given[field]`` is what the lab keeps: absent (then set to it), or equal to it."""
    value = given.get(field)
    if value is not None and value != kept.get(field):
        raise ObjectError(f"{what}: field is immutable ({kept.get(field)}, not {value!r})")
    if field in kept:
        given[field] = copy.deepcopy(kept[field])
