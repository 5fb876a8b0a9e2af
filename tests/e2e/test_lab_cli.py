"""`ambit lab` run as a user runs it: real namespaces, the real CA and, when it can run, the real agent.
Every lab gets a unique name and is removed in a `finally`, and every test checks that nothing of it is
left: namespaces, processes, files."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from agent.capture import netns
from agent.lab import runtime as rt
from agent.lab.runtime import LabInfo, LabPaths
from agent.lab.state import LabObjects
from tests.fixtures.eventually import eventually_sync
from tests.fixtures.lab_cli import LAB_CLI, lab_cli, leftovers, unique_lab_name
from tests.fixtures.machine import needs_bcc


def gone(pid: int) -> bool:
    """No such process, or only its zombie (init reaps orphans in its own time)."""
    stat = rt._stat(pid)
    return stat is None or stat[0] in "ZX"


@pytest.fixture
def lab_name() -> Iterator[str]:
    yield from unique_lab_name("t")


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


@pytest.mark.timeout(240)
@needs_bcc
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

    eventually_sync(lambda: "ambit_pod_ingress" in pod_filter(), "the agent captures the enrolled pod", within=30,
               interval=0.1)

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
    # Namespaces are torn down asynchronously by the kernel.
    eventually_sync(lambda: not any(_prog_exists(p) for p in progs), "the agents' programs are unloaded", within=20,
               interval=0.2)
