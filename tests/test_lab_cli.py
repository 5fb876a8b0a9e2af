"""`ambit lab`: the cluster-state module (no root), and the CLI run as a user runs it (root: real namespaces,
the real CA and, when it can run, the real agent). Every lab gets a unique name and is removed in a
`finally`, and every test checks that nothing of it is left: namespaces, processes, files."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.ca.auth import PodStateFile
from agent.capture import netns
from agent.lab import control, state
from agent.lab import runtime as rt
from agent.lab.runtime import LabInfo, LabPaths
from agent.lab.state import LabObjects, NotFound, StateError
from agent.lab.topology import Lab, Node, Pod
from agent.mesh.store import AMBIENT, DATAPLANE_MODE, build_state, enrolled
from agent.sources.objectfile import kubernetes_objects
from tests.conftest import needs_root
from tests.lab_helpers import lab_processes, netns_files

LAB_CLI = [sys.executable, "-m", "agent.lab.cli"]


# -- the cluster state (no root) ---------------------------------------------------------------------------------
def fake_topology(nodes: int, pods: int) -> Lab:
    """A topology as `Lab.up` describes one, without making namespaces."""
    lab = Lab(lab_id="abc123", prefix="x.", switch="x.abc123-sw")
    for i in range(nodes):
        node = Node(index=i, netns=f"x.abc123-n{i}", ip=f"192.168.200.{10 + i}", uplink="eth0",
                    pod_cidr=f"10.200.{i}.0/24")
        lab.nodes.append(node)
        for k in range(pods):
            lab.pods.append(Pod(index=len(lab.pods), netns=f"x.abc123-n{i}p{k}", ip=f"10.200.{i}.{10 + k}",
                                node=node, host_ifname=f"lxc{k}"))
    return lab


def planned_info(nodes: int = 2, pods: int = 3, namespaces: tuple[str, ...] = ("default", "shop")) -> LabInfo:
    info = LabInfo(name="x", prefix="x.", namespaces=[*namespaces, "istio-system"])
    info.nodes, info.pods = control.plan(fake_topology(nodes, pods), list(namespaces))
    return info


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
    assert first["status"] == {"podIP": "10.200.0.10", "hostIP": "192.168.200.10", "phase": "Running"}
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
    pod = state.pod_object(namespace="default", name="p", uid="u", node="node-1", pod_ip="10.0.0.1",
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


# -- the CLI on real namespaces (root) ------------------------------------------------------------------------------
def lab_cli(name: str, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([*LAB_CLI, "--name", name, *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"ambit lab {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res


def processes_of(name: str) -> list[str]:
    """Command lines mentioning the lab's directory or namespaces (CA, agents, exec'd commands), pytest's aside."""
    return [p for p in lab_processes(name) if "pytest" not in p]


def gone(pid: int) -> bool:
    """No such process, or only its zombie (init reaps orphans in its own time)."""
    stat = rt._stat(pid)
    return stat is None or stat[0] in "ZX"


def leftovers(name: str) -> list[str]:
    left = [n for n in netns.list_netns() if n.startswith(rt.netns_prefix(name))]
    left += [str(p) for p in [LabPaths.of(name).root] if p.exists()] + netns_files(name)
    return left + processes_of(name)


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = f"t-{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        try:
            control.down(name, timeout=5)
        finally:
            assert leftovers(name) == []


@needs_root
@pytest.mark.timeout(120)
def test_up_status_exec_down(lab_name: str) -> None:
    res = lab_cli(lab_name, "up", "--no-agents", "--nodes", "2", "--pods", "2", "--namespaces", "default,shop")
    assert f"lab {lab_name!r} is up" in res.stdout
    paths = LabPaths.of(lab_name)
    for f in ("lab.json", "state.yaml", "tokens.yaml", "tokens/node-1", "tokens/node-2", "ca/root-cert.pem",
              "logs/ca.log", "pids/ca.json"):
        assert (paths.root / f).exists(), f
    assert (paths.root / "tokens/node-1").stat().st_mode & 0o077 == 0
    tokens = yaml.safe_load(paths.tokens.read_text())
    assert sorted(tokens.values()) == ["node-1", "node-2"]
    assert tokens[(paths.root / "tokens/node-2").read_text().strip()] == "node-2"

    info = LabInfo.load(paths)
    assert [n.name for n in info.nodes] == ["node-1", "node-2"]
    assert set(info.netns) == {n for n in netns.list_netns() if n.startswith(f"{lab_name}.")}
    assert len(info.netns) == 1 + 2 + 4  # switch, nodes, pods
    assert [(p.key, p.node, p.ip, p.host_ifname) for p in info.pods] == [
        ("default/app-1-1", "node-1", "10.200.0.10", "lxc0"), ("shop/app-1-2", "node-1", "10.200.0.11", "lxc1"),
        ("default/app-2-1", "node-2", "10.200.1.10", "lxc0"), ("shop/app-2-2", "node-2", "10.200.1.11", "lxc1")]
    assert info.ca_address == "192.168.200.10:15012"

    again = lab_cli(lab_name, "up", "--no-agents", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert f"ambit lab down --name {lab_name}" in again.stderr

    text = lab_cli(lab_name, "status").stdout
    assert re.search(r"node-1\s+\S+-n0\s+192\.168\.200\.10\s+eth0\s+10\.200\.0\.0/24\s+not running", text), text
    assert re.search(r"shop/app-2-2\s+node-2\s+10\.200\.1\.11\s+app-2-2\s+no\s+app=app-2-2", text), text
    assert "CA: ready" in text and str(paths.logs) in text
    status = json.loads(lab_cli(lab_name, "status", "--json").stdout)
    assert status["ca"]["state"] == "ready" and [n["agent"]["state"] for n in status["nodes"]] == ["not running"] * 2
    assert [p["service_account"] for p in status["pods"]] == ["app-1-1", "app-1-2", "app-2-1", "app-2-2"]

    out = lab_cli(lab_name, "exec", "app-1-2", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "10.200.0.11/32" in out
    assert lab_cli(lab_name, "exec", "shop/app-2-2", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert "10.200.0.0/24 via 192.168.200.10" in lab_cli(lab_name, "exec", "node-2", "--", "ip", "route").stdout
    missing = lab_cli(lab_name, "exec", "app-9-9", "--", "true", check=False)
    assert missing.returncode == 1 and "no pod or node 'app-9-9'" in missing.stderr

    # The lab's CA authorizes by the lab's tokens and state: node-2 gets its own pods' identities only.
    probe = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from agent.identity.keys import make_csr, new_key\n"
        "from agent.identity.ca_client import CaClient, CaRequestError\n"
        "from hbone.identity import SpiffeId, TrustBundle\n"
        "async def main(address, bundle, token):\n"
        "    c = CaClient(address, TrustBundle('cluster.local', Path(bundle).read_bytes()), Path(token))\n"
        "    for ns, sa in (('default', 'app-2-1'), ('default', 'app-1-1')):\n"
        "        ident = SpiffeId('cluster.local', ns, sa)\n"
        "        try:\n"
        "            print(sa, 'issued', len(await c.create_certificate(make_csr(ident, new_key()), ident)))\n"
        "        except CaRequestError as e:\n"
        "            print(sa, 'refused', e.code.name)\n"
        "    await c.close()\n"
        "asyncio.run(main(*sys.argv[1:]))\n")
    out = lab_cli(lab_name, "exec", "node-2", "--", sys.executable, "-c", probe, info.ca_address,
                  str(paths.trust_bundle), str(paths.token_file("node-2"))).stdout
    assert out.splitlines() == ["app-2-1 issued 2", "app-1-1 refused PERMISSION_DENIED"]

    # Something left running in a pod by hand is removed too.
    lab_cli(lab_name, "exec", "app-1-1", "--", "sh", "-c", "sleep 300 > /dev/null 2>&1 &")
    ca_pid = json.loads((paths.pids / "ca.json").read_text())["pid"]
    res = lab_cli(lab_name, "down", timeout=60)
    assert "stopped ca" in res.stdout and "stray process 'sleep 300'" in res.stdout
    assert leftovers(lab_name) == []
    assert gone(ca_pid)
    assert "nothing to remove" in lab_cli(lab_name, "down").stdout


@needs_root
@pytest.mark.timeout(120)
def test_label_changes_the_state_file_atomically(lab_name: str) -> None:
    lab_cli(lab_name, "up", "--no-agents", "--nodes", "1", "--pods", "2")
    path = LabPaths.of(lab_name).state
    inode = path.stat().st_ino
    out = lab_cli(lab_name, "label", "namespace", "default", "istio.io/dataplane-mode=ambient").stdout
    assert out.strip() == "namespace/default labeled"
    assert path.stat().st_ino != inode
    st = LabObjects.load(path)
    assert st.namespace_labels("default") == {"istio.io/dataplane-mode": "ambient"}
    assert all(st.is_enrolled(p) for p in st.of_kind("Pod"))

    conflict = lab_cli(lab_name, "label", "ns", "default", "istio.io/dataplane-mode=none", check=False)
    assert conflict.returncode == 1 and "--overwrite" in conflict.stderr
    lab_cli(lab_name, "label", "pod", "default/app-1-2", "istio.io/dataplane-mode=none", "version=v2")
    lab_cli(lab_name, "label", "pod", "app-1-1", "app-")  # namespace from -n, default "default"
    status = json.loads(lab_cli(lab_name, "status", "--json").stdout)
    assert [(p["name"], p["labels"], p["enrolled"]) for p in status["pods"]] == [
        ("app-1-1", {}, True),
        ("app-1-2", {"app": "app-1-2", "istio.io/dataplane-mode": "none", "version": "v2"}, False)]
    lab_cli(lab_name, "label", "pod", "default/app-1-2", "istio.io/dataplane-mode-", "version-")
    lab_cli(lab_name, "label", "namespace", "default", "istio.io/dataplane-mode-")
    st = LabObjects.load(path)
    assert st.namespace_labels("default") == {} and not any(st.is_enrolled(p) for p in st.of_kind("Pod"))

    missing = lab_cli(lab_name, "label", "pod", "default/nope", "a=b", check=False)
    assert missing.returncode == 1 and 'pods "nope"' in missing.stderr and "NotFound" in missing.stderr
    bad = lab_cli(lab_name, "label", "namespace", "default", "a=b c", check=False)
    assert bad.returncode == 1 and "invalid value" in bad.stderr

    # Concurrent kubectl-style edits: none lost (one lock, read-modify-write, rename).
    procs = [subprocess.Popen([*LAB_CLI, "--name", lab_name, "label", "namespace", "default", f"k{i}=v{i}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(6)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    assert LabObjects.load(path).namespace_labels("default") == {f"k{i}": f"v{i}" for i in range(6)}
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@needs_root
@pytest.mark.timeout(120)
def test_down_after_a_torn_up_and_dead_processes(lab_name: str) -> None:
    """`down` finds everything by the lab's name even when lab.json and the pid files are gone and the
    CA was killed; `up` refuses while namespaces of the old lab are left."""
    lab_cli(lab_name, "up", "--no-agents", "--nodes", "1", "--pods", "1")
    paths = LabPaths.of(lab_name)
    ca = rt.ProcRecord.load(paths.pid_file("ca"))
    assert ca is not None and rt.alive(ca)
    rt.stop([ca], timeout=0, kill=True)
    paths.lab_json.unlink()
    for f in paths.pids.iterdir():
        f.unlink()
    status = lab_cli(lab_name, "status", check=False)
    assert status.returncode == 1 and "cannot read" not in status.stderr  # a missing lab.json: "no lab"
    assert lab_cli(lab_name, "down").returncode == 0
    assert leftovers(lab_name) == []

    # Only namespaces left behind (the directory removed by hand).
    lab_cli(lab_name, "up", "--no-agents", "--nodes", "1", "--pods", "1")
    lab_cli(lab_name, "exec", "node-1", "--", "sh", "-c", "sleep 300 > /dev/null 2>&1 &")
    for rec in rt.records(paths):
        rt.stop([rec], timeout=5)
    import shutil

    shutil.rmtree(paths.root)
    refused = lab_cli(lab_name, "up", "--no-agents", check=False)
    assert refused.returncode == 1 and "network namespaces of an earlier lab" in refused.stderr
    lab_cli(lab_name, "down")
    assert leftovers(lab_name) == []


@needs_root
@pytest.mark.timeout(120)
def test_up_fails_cleanly_when_an_agent_is_not_ready(lab_name: str) -> None:
    """No agent is ready 0.3 s after start (or it cannot start at all): `up` shows the agent's log and
    removes the whole lab, keeping a copy of the logs."""
    res = lab_cli(lab_name, "up", "--nodes", "1", "--pods", "1", "--timeout", "0.3", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "agent-node-1" in res.stderr and ("not ready after 0.3s" in res.stderr or "exited" in res.stderr)
    assert "=== ambit lab" not in res.stderr.splitlines()[0]
    kept = re.search(r"logs of the failed lab: (\S+)", res.stderr)
    assert kept is not None
    try:
        assert sorted(os.listdir(kept.group(1))) == ["agent-node-1.log", "ca.log"]
    finally:
        import shutil

        shutil.rmtree(kept.group(1), ignore_errors=True)
    assert leftovers(lab_name) == []


def _bcc_usable() -> bool:
    return importlib.util.find_spec("bcc") is not None and Path(f"/lib/modules/{os.uname().release}/build").exists()


def _prog_ids(ns: str) -> set[int]:
    ids = set()
    for link in json.loads(netns.run(None, ["ip", "-n", ns, "-j", "link", "show"]).stdout):
        out = netns.run(ns, ["tc", "filter", "show", "dev", link["ifname"], "ingress"]).stdout
        ids |= {int(i) for i in re.findall(r"ambit\S* direct-action .*? id (\d+)", out)}
    return ids


def _prog_exists(prog_id: int) -> bool:
    from agent.capture import bpfsys

    try:
        os.close(bpfsys.prog_get_fd_by_id(prog_id))
        return True
    except OSError as e:
        assert e.errno == errno.ENOENT
        return False


@needs_root
@pytest.mark.timeout(240)
@pytest.mark.skipif(not _bcc_usable(), reason="the agent needs bcc and kernel headers (see LAB-FACTS.md)")
def test_up_with_agents_then_kill_restart_and_down(lab_name: str) -> None:
    lab_cli(lab_name, "up", "--nodes", "2", "--pods", "1", "--timeout", "120", timeout=200)
    paths = LabPaths.of(lab_name)
    info = LabInfo.load(paths)
    status = json.loads(lab_cli(lab_name, "status", "--json").stdout)
    assert [n["agent"]["state"] for n in status["nodes"]] == ["ready", "ready"]
    lab_cli(lab_name, "label", "namespace", "default", "istio.io/dataplane-mode=ambient")
    node1 = info.nodes[0].netns

    def pod_filter() -> str:
        return netns.run(node1, ["tc", "filter", "show", "dev", "lxc0", "ingress"]).stdout

    deadline = time.monotonic() + 30
    while "ambit_pod_ingress" not in pod_filter():
        assert time.monotonic() < deadline, "the agent did not capture the enrolled pod within 30 s"
        time.sleep(0.1)

    # SIGKILL: the agent is gone, its programs stay (fail closed); then it comes back.
    out = lab_cli(lab_name, "agent", "stop", "node-1", "--kill").stdout
    assert "SIGKILL" in out
    status = json.loads(lab_cli(lab_name, "status", "--json").stdout)
    assert status["nodes"][0]["agent"]["state"] == "not running"
    assert "ambit_pod_ingress" in pod_filter()
    assert "agent-node-1 ready" in lab_cli(lab_name, "agent", "start", "1", timeout=200).stdout
    again = lab_cli(lab_name, "agent", "start", "node-1", check=False)
    assert again.returncode == 1 and "already running" in again.stderr
    lab_cli(lab_name, "agent", "restart", "all", timeout=200)
    status = json.loads(lab_cli(lab_name, "status", "--json").stdout)
    assert [n["agent"]["state"] for n in status["nodes"]] == ["ready", "ready"]

    progs = set().union(*(_prog_ids(n.netns) for n in info.nodes))
    assert progs, "no ambit programs attached in the nodes"
    agent_pids = [n["agent"]["pid"] for n in status["nodes"]]
    lab_cli(lab_name, "down", timeout=60)
    assert leftovers(lab_name) == []
    assert all(gone(pid) for pid in agent_pids)
    deadline = time.monotonic() + 20  # namespaces are torn down asynchronously by the kernel
    while any(_prog_exists(p) for p in progs):
        assert time.monotonic() < deadline, f"programs still loaded: {[p for p in progs if _prog_exists(p)]}"
        time.sleep(0.2)
