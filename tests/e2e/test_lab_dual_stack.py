"""`ambit lab up --dual-stack`: every node and pod has an IPv6 address beside its IPv4 one, the state file lists
both in status.podIPs, pods reach pods on other nodes over IPv6 by address, and `ambit lab status` shows both.

The agents run (their listeners are dual-stack) with nothing enrolled: the capture of IPv6 is not part of this
test. Dual-stack Services: an IPv6 cluster IP and the kube-proxy's IPv6 table, without agents. The lab is removed
in a `finally`, and nothing of it may be left."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.capture import netns
from agent.lab import control, hosts
from agent.lab.runtime import LabInfo, LabPaths
from agent.lab.state import LabObjects
from agent.mesh.store import build_state
from tests.fixtures import lab_helpers as h
from tests.fixtures.lab_cli import lab_cli, leftovers, unique_lab_name
from tests.fixtures.lab_helpers import Client, EchoServer, Payload
from tests.fixtures.machine import needs_bcc

pytestmark = [needs_bcc]

PORT = 8080


@pytest.fixture
def lab_name() -> Iterator[str]:
    yield from unique_lab_name("ds")


@pytest.mark.timeout(240)
def test_dual_stack_lab_pods_reach_each_other_over_ipv6(lab_name: str) -> None:
    res = lab_cli(lab_name, "up", "--dual-stack", "--nodes", "2", "--pods", "2", timeout=200)
    assert "dual stack (IPv4 and IPv6)" in res.stdout and "agents ready" in res.stdout
    paths = LabPaths.of(lab_name)
    info = LabInfo.load(paths)
    assert info.dual_stack
    assert [(n.ip, n.ip6, n.pod_cidr6) for n in info.nodes] == [
        ("192.168.200.10", "fd00:192:168::10", "fd00:200::/64"),
        ("192.168.200.11", "fd00:192:168::11", "fd00:200:1::/64")]
    assert [(p.name, p.ip, p.ip6) for p in info.pods] == [
        ("app-1-1", "10.200.0.10", "fd00:200::10"), ("app-1-2", "10.200.0.11", "fd00:200::11"),
        ("app-2-1", "10.200.1.10", "fd00:200:1::10"), ("app-2-2", "10.200.1.11", "fd00:200:1::11")]

    # The state file: status.podIPs lists both families, the primary (status.podIP) IPv4; the agents' store finds
    # every pod by either address.
    state = LabObjects.load(paths.state)
    pods = {p["metadata"]["name"]: p["status"] for p in state.of_kind("Pod")}
    assert pods["app-2-1"]["podIP"] == "10.200.1.10"
    assert pods["app-2-1"]["podIPs"] == [{"ip": "10.200.1.10"}, {"ip": "fd00:200:1::10"}]
    mesh = build_state(state.objects)
    assert all(mesh.by_ip(p.ip6) is mesh.by_ip(p.ip) is not None for p in info.pods)

    # In the pods: the IPv6 address, the IPv6 default route, the pod's name at both addresses.
    a, b = info.pods[0], info.pods[2]
    assert a.node != b.node
    out = lab_cli(lab_name, "exec", a.key, "--", "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope",
                  "global").stdout
    assert f"{a.ip6}/128" in out
    assert "default via fe80::ecee:eeff:feee:eeee" in lab_cli(lab_name, "exec", a.key, "--", "ip", "-6",
                                                             "route").stdout
    own = hosts.path(a.netns).read_text().splitlines()
    assert f"{a.ip}\t{a.name}" in own and f"{a.ip6}\t{a.name}" in own

    # A pod reaches a pod on the other node over IPv6, by address, and is seen there at its own IPv6 address
    # (routed, not translated); IPv4 works as before.
    payload = Payload.make(1 << 20)
    with EchoServer(b, PORT, host="::") as server:  # one socket, both families
        with Client(a, (b.ip6, PORT)) as client:
            echo = client.exchange(payload)
        assert echo.server_sha256 == echo.echoed_sha256 == payload.sha256
        assert echo.peer == client.local and echo.peer[0] == a.ip6
        with Client(a, (b.ip, PORT)) as client:
            assert client.exchange(payload).peer[0] == a.ip
        assert [ip for ip, _port in server.peers] == [a.ip6, a.ip]
    for node in info.nodes:  # each node routes the other node's IPv6 pod CIDR, and reaches its pods itself
        assert h.reachable(node.netns, b.ip6 if node.name != b.node else a.ip6)

    # The agents run with nothing enrolled; their listeners take both families (one socket per port, on [::]).
    assert not any(control.status(lab_name)["pods"][i]["enrolled"] for i in range(len(info.pods)))
    for node in info.nodes:
        listeners = h.listening(node.netns, [15001, 15006, 15008])
        assert len(listeners) == 3 and all(re.search(r"(\[::\]|\*):1500[168]\s", line) for line in listeners), \
            listeners
        assert netns.run(node.netns, ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout.strip() == "1"

    # `ambit lab status` shows both addresses of every node and pod.
    text = lab_cli(lab_name, "status").stdout
    assert re.search(r"node-2\s+\S+-n1\s+192\.168\.200\.11,fd00:192:168::11\s+eth0\s+"
                     r"10\.200\.1\.0/24,fd00:200:1::/64\s+ready", text), text
    assert re.search(r"default/app-2-1\s+node-2\s+10\.200\.1\.10,fd00:200:1::10\s+app-2-1\s+no\s", text), text
    status = json.loads(lab_cli(lab_name, "status", "--json").stdout)
    assert status["dual_stack"] is True
    assert [p["ips"] for p in status["pods"]] == [[p.ip, p.ip6] for p in info.pods]

    assert lab_cli(lab_name, "down", timeout=60).returncode == 0
    assert leftovers(lab_name) == []


@pytest.mark.timeout(120)
def test_without_dual_stack_the_lab_stays_ipv4_only(lab_name: str) -> None:
    """The default (what `make demo` runs): no IPv6 address anywhere, IPv6 off in every namespace."""
    lab_cli(lab_name, "up", "--no-agents", "--nodes", "1", "--pods", "1")
    info = LabInfo.load(LabPaths.of(lab_name))
    assert not info.dual_stack and info.pods[0].ip6 == "" and info.nodes[0].ip6 == ""
    pod = info.pods[0]
    assert netns.run(pod.netns, ["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).stdout.strip() == "1"
    assert netns.run(pod.netns, ["ip", "-6", "-o", "addr"]).stdout.strip() == ""
    status = json.loads(lab_cli(lab_name, "status", "--json").stdout)
    assert status["dual_stack"] is False and status["pods"][0]["ips"] == [pod.ip]


DUAL_SERVICES = """\
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
 "spec": {"type": "NodePort", "ipFamilyPolicy": "PreferDualStack", "selector": {"app": "app-1-1"},
          "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "v4", "namespace": "default"},
 "spec": {"type": "NodePort", "selector": {"app": "app-1-1"}, "ports": [{"port": 80, "targetPort": 8080,
                                                                         "nodePort": 30081}]}}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "local", "namespace": "default"},
 "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ipFamilyPolicy": "RequireDualStack",
          "selector": {"app": "app-1-1"}, "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30082}]}}
---
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "empty", "namespace": "default"},
 "spec": {"ipFamilies": ["IPv6"], "selector": {"app": "nobody"}, "ports": [{"port": 80}]}}
"""


@pytest.mark.timeout(240)
def test_dual_stack_services_get_an_ipv6_vip_and_the_kube_proxy_serves_it(lab_name: str, tmp_path: Path) -> None:
    """The lab alone (no agents): a PreferDualStack NodePort Service gets an IPv6 cluster IP of fd00:96::/112
    beside its IPv4 one, both in the pods' hosts files; the nodes' kube-proxy DNATs its IPv6 VIP (client address
    kept) and its node port on every node's IPv6 address (masqueraded to the forwarding node, as for IPv4; with
    externalTrafficPolicy Local a pod keeps its address) to the endpoint's IPv6 address; an IPv4-only Service
    has no IPv6 node port, and an IPv6 VIP without endpoints is refused at once."""
    lab_cli(lab_name, "up", "--dual-stack", "--no-agents", "--nodes", "2", "--pods", "2", timeout=200)
    info = LabInfo.load(LabPaths.of(lab_name))
    services_file = tmp_path / "services.yaml"
    services_file.write_text(DUAL_SERVICES)
    assert "service/web created" in lab_cli(lab_name, "apply", "-f", str(services_file)).stdout
    status = {s["name"]: s for s in json.loads(lab_cli(lab_name, "status", "--json").stdout)["services"]}
    assert status["web"]["vips"] == ["10.96.0.1", "fd00:96::1"] and status["v4"]["vips"] == ["10.96.0.2"]
    assert status["local"]["vips"] == ["10.96.0.3", "fd00:96::2"] and status["empty"]["vips"] == ["fd00:96::3"]
    backend, client = info.pods[0], info.pods[2]  # app-1-1 on node-1, app-2-1 on node-2
    assert sorted(e["ip"] for e in status["web"]["endpoints"]) == [backend.ip, backend.ip6]
    assert "fd00:96::1\tweb web.default" in hosts.path(client.netns).read_text()
    node1, node2 = info.nodes
    payload = Payload.make(4096)
    with EchoServer(backend, PORT, host="::"):
        def peer(src: h.InNetns, address: tuple[str, int]) -> str:
            """Whom the backend saw, after a byte-exact exchange."""
            with Client(src, address) as c:
                echo = c.exchange(payload)
            assert echo.server_sha256 == echo.echoed_sha256 == payload.sha256
            return echo.peer[0]

        assert peer(client, ("fd00:96::1", 80)) == client.ip6  # the VIP: DNAT only
        assert peer(client, ("10.96.0.1", 80)) == client.ip
        assert peer(client, (node1.ip6, 30080)) == node1.ip6  # Cluster: masqueraded by the node that DNATs
        assert peer(backend, (node2.ip6, 30080)) == node2.ip6
        assert peer(node2, (node2.ip6, 30080)) == node2.ip6  # from the node itself (its output chain)
        # externalTrafficPolicy Local: a pod of the cluster keeps its address (kube-proxy's short cut, IPv6 range)
        assert peer(client, (node1.ip6, 30082)) == peer(client, (node2.ip6, 30082)) == client.ip6
        for refused in [("fd00:96::3", 80), (node1.ip6, 30081)]:  # no endpoint; no IPv6 node port for v4
            with pytest.raises(ConnectionRefusedError):
                Client(client, refused, connect_timeout=3)
        assert peer(client, (node1.ip, 30081)) == node1.ip
