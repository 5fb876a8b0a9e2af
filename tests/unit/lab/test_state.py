"""`ambit lab`'s cluster state without namespaces: the initial state file (a contract the agent and the CA
read), kubectl-like labels, apply/delete, enrollment and atomic edits; the CLI as a user runs it on real
namespaces is tests/e2e/test_lab_cli.py."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from agent.ca.auth import PodStateFile
from agent.lab import control, state
from agent.lab.runtime import LabInfo
from agent.lab.state import LabObjects, NotFound, StateError
from agent.lab.topology import Lab, Node, Pod
from agent.mesh.store import AMBIENT, DATAPLANE_MODE, build_state, enrolled
from agent.sources.objectfile import kubernetes_objects

LAB_CLI = [sys.executable, "-m", "agent.lab.cli"]


def fake_topology(nodes: int, pods: int, dual_stack: bool = False) -> Lab:
    """A topology as `Lab.up` describes one, without making namespaces."""
    lab = Lab(lab_id="abc123", prefix="x.", switch="x.abc123-sw", dual_stack=dual_stack)
    for i in range(nodes):
        node = Node(index=i, netns=f"x.abc123-n{i}", ip=f"192.168.200.{10 + i}", uplink="eth0",
                    pod_cidr=f"10.200.{i}.0/24", ip6=f"fd00:192:168::{10 + i}" if dual_stack else "",
                    pod_cidr6=f"fd00:200:{i}::/64" if dual_stack else "")
        lab.nodes.append(node)
        for k in range(pods):
            lab.pods.append(Pod(index=len(lab.pods), netns=f"x.abc123-n{i}p{k}", ip=f"10.200.{i}.{10 + k}",
                                node=node, host_ifname=f"lxc{k}", ip6=f"fd00:200:{i}::{10 + k}" if dual_stack else ""))
    return lab


def planned_info(nodes: int = 2, pods: int = 3, namespaces: tuple[str, ...] = ("default", "shop")) -> LabInfo:
    info = LabInfo(name="x", prefix="x.", namespaces=[*namespaces, "istio-system"])
    info.nodes, info.pods = control.plan(fake_topology(nodes, pods), list(namespaces))
    return info


def test_a_dual_stack_lab_lists_both_addresses_of_each_pod() -> None:
    info = LabInfo(name="x", prefix="x.", namespaces=["default", "istio-system"], dual_stack=True)
    info.nodes, info.pods = control.plan(fake_topology(2, 1, dual_stack=True), ["default"])
    assert [(n.ip6, n.pod_cidr6) for n in info.nodes] == [("fd00:192:168::10", "fd00:200:0::/64"),
                                                          ("fd00:192:168::11", "fd00:200:1::/64")]
    pods = control.initial_state(info).of_kind("Pod")
    assert [p["status"]["podIPs"] for p in pods] == [[{"ip": "10.200.0.10"}, {"ip": "fd00:200:0::10"}],
                                                     [{"ip": "10.200.1.10"}, {"ip": "fd00:200:1::10"}]]
    assert [p["status"]["podIP"] for p in pods] == ["10.200.0.10", "10.200.1.10"]  # the primary: IPv4
    mesh = build_state(control.initial_state(info).objects)
    second = mesh.by_ip("fd00:200:1::10")
    assert second is not None and second is mesh.by_ip("10.200.1.10") and second.name == "app-2-1"


def test_initial_state_follows_the_contract() -> None:
    info = planned_info()
    doc = yaml.safe_load(control.initial_state(info).dump())
    assert doc["apiVersion"] == "v1" and doc["kind"] == "List"
    spaces = [o for o in doc["items"] if o["kind"] == "Namespace"]
    assert [(o["apiVersion"], o["metadata"]) for o in spaces] == [
        ("v1", {"name": n, "labels": {}}) for n in ("default", "shop", "istio-system")]
    pods = [o for o in doc["items"] if o["kind"] == "Pod"]
    assert [f"{p['metadata']['namespace']}/{p['metadata']['name']}" for p in pods] == [
        "default/app-1-1", "shop/app-1-2", "default/app-1-3", "default/app-2-1", "shop/app-2-2", "default/app-2-3"]
    first = pods[0]
    assert first["apiVersion"] == "v1"
    assert first["metadata"]["labels"] == {"app": "app-1-1"}
    assert re.fullmatch(r"[0-9a-f-]{36}", first["metadata"]["uid"])
    assert first["spec"] == {"nodeName": "node-1", "serviceAccountName": "app-1-1", "hostNetwork": False}
    assert first["status"] == {"podIP": "10.200.0.10", "podIPs": [{"ip": "10.200.0.10"}], "hostIP": "192.168.200.10",
                               "phase": "Running"}
    assert pods[4]["spec"]["nodeName"] == "node-2" and pods[4]["status"]["podIP"] == "10.200.1.11"
    assert len({p["metadata"]["uid"] for p in pods}) == len(pods)


async def test_the_agent_and_the_ca_read_the_lab_state(tmp_path: Path) -> None:
    """The state file is a contract: parse it with the agent's and the CA's own readers."""
    st = control.initial_state(planned_info())
    st.label("Namespace", "", "shop", [(DATAPLANE_MODE, AMBIENT)])
    path = tmp_path / "state.yaml"
    st.save(path)
    cluster = build_state(kubernetes_objects(path.read_bytes()))
    assert sorted(w.key for w in cluster.workloads.values() if w.enrolled) == ["shop/app-1-2", "shop/app-2-2"]
    third = cluster.by_ip("10.200.1.12")
    assert third is not None and third.service_account == "app-2-3"
    assert await PodStateFile(path).service_accounts_on_node("node-1") == {
        ("default", "app-1-1"), ("shop", "app-1-2"), ("default", "app-1-3")}


def test_label_like_kubectl() -> None:
    st = control.initial_state(planned_info())
    mode = DATAPLANE_MODE
    assert st.label("Namespace", "", "default", [(mode, "ambient")]) == "namespace/default labeled"
    assert st.namespace_labels("default") == {mode: "ambient"}
    assert st.label("Namespace", "", "default", [(mode, "ambient")]) == "namespace/default not labeled"
    with pytest.raises(StateError, match="--overwrite is false"):
        st.label("Namespace", "", "default", [(mode, "none")])
    assert st.label("Namespace", "", "default", [(mode, "none")], overwrite=True) == "namespace/default labeled"
    assert st.label("Pod", "shop", "app-1-2", [("version", "v1"), ("app", None)]) == "pod/app-1-2 labeled"
    assert st.get("Pod", "shop", "app-1-2")["metadata"]["labels"] == {"version": "v1"}  # type: ignore[index]
    assert st.label("Pod", "shop", "app-1-2", [("version", None)]) == "pod/app-1-2 unlabeled"
    assert st.label("Pod", "shop", "app-1-2", [("nope", None)]) == 'label "nope" not found.\npod/app-1-2 not labeled'
    with pytest.raises(NotFound, match='pods "app-1-2" in namespace "default" not found'):
        st.label("Pod", "default", "app-1-2", [("a", "b")])
    with pytest.raises(NotFound):
        st.label("Namespace", "", "nope", [("a", "b")])


@pytest.mark.parametrize(("args", "expected"), [
    (["a=b", "c-", "istio.io/dataplane-mode=ambient", "empty="],
     [("a", "b"), ("c", None), ("istio.io/dataplane-mode", "ambient"), ("empty", "")]),
    (["bad key=1"], "invalid label key"), (["-x=1"], "invalid label key"), (["a=b c"], "invalid value"),
    (["Bad_Prefix/x=1"], "prefix must be a DNS subdomain"), ([f"{'a' * 64}=1"], "invalid label key"),
    (["a"], "expected key=value or key-"), (["a=1", "a-"], "more than once"), ([], "at least one"),
])
def test_label_arguments(args: list[str], expected: list[state.LabelChange] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(StateError, match=expected):
            state.parse_label_changes(args)
    else:
        assert state.parse_label_changes(args) == expected


def test_put_and_remove_are_apply_and_delete() -> None:
    """The operations `ambit lab apply -f` / `delete` will use: identity (kind, namespace, name)."""
    st = control.initial_state(planned_info(nodes=1, pods=1))
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "deny-all"}, "spec": {}}
    assert st.put(policy) == "created"
    assert st.get("AuthorizationPolicy", "default", "deny-all")["metadata"]["namespace"] == "default"  # type: ignore[index]
    assert st.put({**policy, "metadata": {"name": "deny-all", "namespace": "default"}}) == "unchanged"
    assert st.put({**policy, "spec": {"action": "DENY"}}) == "configured"
    assert st.put({**policy, "metadata": {"name": "deny-all", "namespace": "istio-system"}}) == "created"
    with pytest.raises(NotFound, match='namespaces "nope" not found'):
        st.put({**policy, "metadata": {"name": "x", "namespace": "nope"}})
    reread = LabObjects.parse(st.dump())
    assert [o["kind"] for o in reread.objects][-2:] == ["AuthorizationPolicy", "AuthorizationPolicy"]
    assert reread.remove("AuthorizationPolicy", "default", "deny-all")["spec"] == {"action": "DENY"}
    with pytest.raises(NotFound):
        reread.remove("AuthorizationPolicy", "default", "deny-all")
    reread.remove("Namespace", "", "istio-system")  # takes its objects along, as in a cluster
    assert reread.of_kind("AuthorizationPolicy") == []
    with pytest.raises(StateError, match="twice"):
        LabObjects([policy, policy])


@pytest.mark.parametrize(("pod_labels", "ns_labels", "extra", "expected"), [
    ({"istio.io/dataplane-mode": "foo"}, {"istio.io/dataplane-mode": "ambient"}, {}, True),  # only none opts out
    ({}, {}, {}, False),
    ({}, {"istio.io/dataplane-mode": "ambient"}, {}, True),
    ({"istio.io/dataplane-mode": "ambient"}, {}, {}, True),
    ({"istio.io/dataplane-mode": "none"}, {"istio.io/dataplane-mode": "ambient"}, {}, False),
    ({}, {"istio.io/dataplane-mode": "ambient"}, {"hostNetwork": True}, False),
    ({}, {"istio.io/dataplane-mode": "ambient"}, {"containers": [{"name": "istio-proxy"}]}, False),
])
def test_enrollment(pod_labels: dict[str, str], ns_labels: dict[str, str], extra: dict[str, object],
                    expected: bool) -> None:
    pod = state.pod_object(namespace="default", name="p", uid="u", node="node-1", pod_ips=["10.0.0.1"],
                           host_ip="192.168.0.1", service_account="p", labels=pod_labels)
    pod["spec"].update(extra)
    assert enrolled(pod, ns_labels) is expected


def test_edits_are_atomic_and_serialized(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    control.initial_state(planned_info(nodes=1, pods=1)).save(path)

    def add(i: int) -> None:
        with state.edit(path) as st:
            time.sleep(0.01)  # widen the read-modify-write window
            st.label("Namespace", "", "default", [(f"k{i}", str(i))])

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert LabObjects.load(path).namespace_labels("default") == {f"k{i}": str(i) for i in range(8)}
    inode = path.stat().st_ino
    with state.edit(path) as st:
        st.label("Pod", "default", "app-1-1", [("x", "1")])
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [".state.yaml.lock", "state.yaml"]  # no temp files
    mtime = path.stat().st_mtime_ns
    with state.edit(path):
        pass  # nothing changed: the file is not rewritten
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(RuntimeError), state.edit(path) as st:
        st.label("Namespace", "", "default", [("x", "y")])
        raise RuntimeError("a failed edit leaves the file alone")
    assert "x" not in LabObjects.load(path).namespace_labels("default")


def test_cli_rejects_bad_names_and_is_registered() -> None:
    from agent.cli.main import COMMANDS
    from agent.lab.cli import main

    assert main(["--name", "Bad.Name", "status"]) == 1
    res = subprocess.run([sys.executable, "-m", "agent.cli", "lab", "--help"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert "lab" in COMMANDS and res.returncode == 0 and "ambit lab up" in res.stdout
