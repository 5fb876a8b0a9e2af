"""A Pod applied to the lab (agent/lab/pods.py): a new version of one of the lab's pods, carrying its containers
(ports, probes) and, when given, labels and annotations; what the lab made (uid, node, service account, network,
address) stays, and a Pod that asks to change it, or that the lab did not make, is refused naming the field."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest

from agent.lab import pods
from agent.lab.state import LabObjects
from agent.mesh.store import MeshStore
from tests.unit.lab import objects as o

PROBED = {"name": "app", "image": "app:1",
          "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9901}],
          "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
          "livenessProbe": {"tcpSocket": {"port": "admin"}},
          "startupProbe": {"grpc": {"port": 9090}}}


def state() -> LabObjects:
    return LabObjects([o.namespace("default"), o.pod("app-1-1", "10.200.0.11", app="app-1-1"),
                       o.pod("app-2-1", "10.200.1.11", "node-2", app="app-2-1")])


def applied(name: str = "app-1-1", *, containers: list[dict[str, Any]] | None = None,
            **fields: Any) -> dict[str, Any]:
    """A Pod as a user writes it: name, namespace and containers; ``fields`` merge into metadata or spec."""
    meta = {"name": name, "namespace": "default", **{k: v for k, v in fields.items() if k in ("labels", "uid",
                                                                                               "annotations")}}
    spec = {"containers": containers if containers is not None else [copy.deepcopy(PROBED)],
            **{k: v for k, v in fields.items() if k not in meta}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def test_a_pod_applied_keeps_what_the_lab_made_and_takes_its_containers() -> None:
    st = state()
    before = st.get("Pod", "default", "app-1-1")
    pod = {**applied(restartPolicy="Always"), "status": {"podIP": "10.9.9.9"}}
    assert pods.admit(st, [pod]) == []
    assert pod["metadata"] == {**before["metadata"], "name": "app-1-1"}  # type: ignore[index]
    assert pod["spec"] == {"containers": [PROBED], "restartPolicy": "Always", "nodeName": "node-1",
                           "serviceAccountName": "app-1-1", "hostNetwork": False}
    assert pod["status"] == before["status"]  # type: ignore[index]  # its address is the lab's
    assert st.put(pod) == "configured"
    store = MeshStore()
    assert store.replace_all(st.objects) == []
    assert store.state.by_ip("10.200.0.11").probe_ports == {8080, 9901, 9090}  # type: ignore[union-attr]
    assert store.state.by_ip("10.200.1.11").probe_ports == frozenset()  # type: ignore[union-attr]


def test_labels_and_annotations_given_replace_the_pods() -> None:
    pod = applied(labels={"app": "web"}, annotations={"note": "x"}, nodeName="node-1",
                  serviceAccountName="app-1-1", serviceAccount="app-1-1", hostNetwork=False)
    assert pods.admit(state(), [pod]) == []
    assert pod["metadata"]["labels"] == {"app": "web"} and pod["metadata"]["annotations"] == {"note": "x"}


def test_a_probe_naming_no_port_is_accepted_and_logged_by_the_agents(caplog: pytest.LogCaptureFixture) -> None:
    st = state()
    pod = applied(containers=[{"name": "app", "livenessProbe": {"httpGet": {"port": "health"}},
                               "readinessProbe": {"tcpSocket": {"port": 8080}}}])
    with caplog.at_level(logging.WARNING, "agent.mesh.convert"):
        assert pods.admit(st, [pod]) == []
        assert caplog.records == []  # admission leaves the problem to the agents, which log it
        st.put(pod)
        store = MeshStore()
        assert store.replace_all(st.objects) == []
    assert store.state.by_ip("10.200.0.11").probe_ports == {8080}  # type: ignore[union-attr]
    assert [r.getMessage() for r in caplog.records] == [
        "Pod default/app-1-1: spec.containers[0].livenessProbe.httpGet.port 'health': container 'app' has no port "
        "of that name (the kubelet cannot run this probe; it adds no probe port)"]


@pytest.mark.parametrize(("pod", "error"), [
    (applied("web"), "Pod default/web: not a pod of this lab: `ambit lab up` makes the pods (a network namespace "
                     "each), and a Pod applied changes one of them (default/app-1-1, default/app-2-1)"),
    (applied(nodeName="node-2"), "Pod default/app-1-1: spec.nodeName: field is immutable (node-1, not 'node-2')"),
    (applied(serviceAccountName="admin"),
     "Pod default/app-1-1: spec.serviceAccountName: field is immutable (app-1-1, not 'admin')"),
    (applied(serviceAccount="admin"),
     "Pod default/app-1-1: spec.serviceAccount: field is immutable (app-1-1, not 'admin')"),
    (applied(hostNetwork=True), "Pod default/app-1-1: spec.hostNetwork: field is immutable (False, not True)"),
    (applied(uid="another"), "Pod default/app-1-1: metadata.uid: field is immutable (uid-default-app-1-1, not "
                             "'another')"),
    (applied(containers=[{"name": "app", "livenessProbe": {"httpGet": {"port": 0}}}]),
     "Pod default/app-1-1: spec.containers[0].livenessProbe.httpGet.port must be a port number 1-65535, not 0"),
    (applied(containers={"app": {}}),  # type: ignore[arg-type]
     "Pod default/app-1-1: spec.containers must be a list, not dict"),
    (applied(labels={"app": 7}), "Pod default/app-1-1: metadata.labels must map strings to strings"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app-1-1"}, "spec": ["app"]},
     "Pod default/app-1-1: spec must be a mapping, not list"),
])
def test_a_pod_that_would_change_what_the_lab_made_is_refused_naming_the_field(pod: dict[str, Any],
                                                                               error: str) -> None:
    st = state()
    before = st.dump()
    assert pods.admit(st, [applied("app-2-1"), pod]) == [error]
    assert st.dump() == before
