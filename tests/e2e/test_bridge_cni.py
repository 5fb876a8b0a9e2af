"""Bridge CNIs (minikube's default `bridge` plugin, Flannel's cni0): the node's route to a pod is the pod subnet
via the bridge, yet `host_ifname_for` must name the pod's own veth (a port of the bridge), never the bridge;
the default lab (/32 routes, kindnet/Calico style) is unchanged.

Labs here: `Lab.up(..., bridge=True)` (each node: cni0 = 10.200.i.1/24, pods 10.200.i.(10+k)/24 on veth<k>
ports) with names `ambit-brcni-<random id>-...`; every lab, mount, agent and server is removed at the end.

The capture tests prove the eBPF programs capture pods whose veth is a bridge port: a socket assigned at
the port would not survive the bridge handing the frame up, and frames between pods of one bridge never
reach the node's IP stack, so the port's program sends enrolled pods' TCP up to the bridge (destination MAC
:= the bridge's) and the program attached to the bridge decides. Inbound from another node, outbound from
an enrolled pod, and pod-to-pod on one node (both ways) all reach the agent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from agent.capture import Redirector, host_ifname_for, netns, sysctls
from agent.capture.links import _fdb_port_hint
from agent.capture.rtnl import Rtnl
from agent.lab import Lab, Node, Pod, topology
from bench.capture_probe import EchoServer, TransparentRelay, exchange, private_bpffs
from tests.fixtures.eventually import eventually_sync
from tests.fixtures.lab_helpers import reachable

pytestmark = pytest.mark.timeout(120)

PREFIX = "ambit-brcni-"


# -- helpers ------------------------------------------------------------------------------------------------
def _json(argv: list[str]) -> list[dict[str, Any]]:
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout
    return list(json.loads(out or "[]"))


def neighbours(ns: str, dev: str | None = None) -> dict[str, str | None]:
    """IP -> link-layer address of the namespace's neighbour table (of `dev`)."""
    argv = ["ip", "-n", ns, "-j", "neigh", "show", *(["dev", dev] if dev else [])]
    return {str(e["dst"]): e.get("lladdr") for e in _json(argv)}


def learned_macs(node: Node) -> set[str]:
    """MACs the node's pod bridge learned from traffic (entries that are not permanent)."""
    entries = _json(["bridge", "-n", node.netns, "-j", "fdb", "show", "br", str(node.bridge)])
    return {str(e["mac"]) for e in entries if "permanent" not in str(e.get("state", ""))}


def ifindex(ns: str, ifname: str) -> int:
    return int(_json(["ip", "-n", ns, "-j", "link", "show", ifname])[0]["ifindex"])


def pod_mac(pod: Pod) -> str:
    return str(_json(["ip", "-n", pod.netns, "-j", "link", "show", pod.ifname])[0]["address"])


def talk(src: Pod, dst_ip: str, port: int = 8080, timeout: float = 3.0) -> tuple[str, bool]:
    """(source IP the server saw, True if the connection went direct = the server saw the client's port)."""
    (_ip, my_port), reply = exchange(src.netns, dst_ip, port, payload=b"hi", timeout=timeout)
    seen = reply.split(b" ", 1)[0].removeprefix(b"peer=").decode()
    ip, port_seen = seen.rsplit(":", 1)
    return ip, int(port_seen) == my_port


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """Bridge mode, 2 nodes x 3 pods (pods A, B, C on node 0; D, E, F on node 1)."""
    made = Lab.up(nodes=2, pods_per_node=3, prefix=PREFIX, bridge=True)
    try:
        yield made
    finally:
        made.down()


# -- the topology ---------------------------------------------------------------------------------------------
def test_bridge_lab_is_a_bridge_cni_and_every_pod_reaches_every_other(lab: Lab) -> None:
    for node in lab.nodes:
        assert node.bridge == "cni0" and node.pod_gateway == str(ipaddress.IPv4Network(node.pod_cidr)[1])
        addrs = _json(["ip", "-n", node.netns, "-j", "-4", "addr", "show", "cni0"])[0]["addr_info"]
        assert [(a["local"], a["prefixlen"]) for a in addrs] == [(node.pod_gateway, 24)]
        routes = _json(["ip", "-n", node.netns, "-j", "route", "show", node.pod_cidr])
        assert [r["dev"] for r in routes] == ["cni0"]  # the subnet via the bridge, no /32 routes
        for pod in lab.pods_of(node):
            port = _json(["ip", "-n", node.netns, "-j", "-d", "link", "show", pod.host_ifname])[0]
            assert port["master"] == "cni0" and port["linkinfo"]["info_kind"] == "veth"
            assert port["linkinfo"]["info_slave_data"]["hairpin"] is True
            pod_routes = _json(["ip", "-n", pod.netns, "-j", "route", "show", "default"])
            assert [r["gateway"] for r in pod_routes] == [node.pod_gateway]
    for src in lab.pods:
        for dst in lab.pods:
            if src is not dst:
                assert reachable(src.netns, dst.ip), f"{src.ip} -> {dst.ip}"
    assert reachable(lab.nodes[0].netns, lab.pods[4].ip)  # node -> pod of another node


def test_default_lab_is_unchanged() -> None:
    with Lab.up(nodes=2, pods_per_node=2, prefix=PREFIX) as lab:
        assert not lab.bridge
        for node in lab.nodes:
            assert node.bridge is None and node.pod_gateway == topology.GATEWAY_IP
            assert "cni0" not in {link["ifname"] for link in lab.links(node.netns)}
            for pod in lab.pods_of(node):
                assert pod.host_ifname == f"lxc{pod.index % 2}"
                routes = _json(["ip", "-n", node.netns, "-j", "route", "show", f"{pod.ip}/32"])
                assert [r["dev"] for r in routes] == [pod.host_ifname]
                link = _json(["ip", "-n", node.netns, "-j", "link", "show", pod.host_ifname])[0]
                assert link["address"] == topology.HOST_VETH_MAC and "master" not in link
                assert host_ifname_for(pod.ip, netns=node.netns) == pod.host_ifname
        a, _b, c, _d = lab.pods
        assert reachable(a.netns, c.ip) and reachable(c.netns, lab.pods[1].ip)
        with pytest.raises(LookupError, match="not a local pod"):
            host_ifname_for(c.ip, netns=lab.nodes[0].netns)
    assert not [n for n in netns.list_netns() if n.startswith(f"{PREFIX}{lab.lab_id}-")]


# -- host_ifname_for ------------------------------------------------------------------------------------------
def test_finds_each_pods_own_veth_before_the_pod_sent_anything() -> None:
    """A fresh lab: no pod has sent a frame (no neighbour entry, nothing learned by the bridge), and the lookup
    neither needs nor makes one (still nothing afterwards, on the node or in the pods)."""
    with Lab.up(nodes=2, pods_per_node=3, prefix=PREFIX, bridge=True) as lab:
        for node in lab.nodes:
            assert neighbours(node.netns, "cni0") == {} and learned_macs(node) == set()
        for pod in lab.pods:
            found = host_ifname_for(pod.ip, netns=pod.node.netns)
            assert found == pod.host_ifname and found != "cni0"
        for node in lab.nodes:
            assert neighbours(node.netns, "cni0") == {} and learned_macs(node) == set()
        assert all(neighbours(pod.netns) == {} for pod in lab.pods)
        with netns.entered(lab.nodes[0].netns):
            rtnl = Rtnl()
        with rtnl:
            assert _fdb_port_hint(rtnl, ifindex(lab.nodes[0].netns, "cni0"), lab.pods[0].ip) is None


def test_hint_from_neighbour_and_fdb_after_traffic(lab: Lab) -> None:
    node = lab.nodes[0]
    a = lab.pods[0]
    assert reachable(a.netns, node.pod_gateway)  # an exchange with the node: ARP both ways, the bridge learns
    assert neighbours(node.netns, "cni0").get(a.ip) == pod_mac(a) and pod_mac(a) in learned_macs(node)
    with netns.entered(node.netns):
        rtnl = Rtnl()
    with rtnl:
        assert _fdb_port_hint(rtnl, ifindex(node.netns, "cni0"), a.ip) == ifindex(node.netns, a.host_ifname)
    assert host_ifname_for(a.ip, netns=node.netns) == a.host_ifname


def test_a_stale_neighbour_entry_does_not_mislead(lab: Lab) -> None:
    """Pod A's IP with pod B's MAC on cni0 (as after an IP reuse): the hint names B's port, the answer is A's."""
    node = lab.nodes[0]
    a, b = lab.pods[0], lab.pods[1]
    assert reachable(b.netns, node.pod_gateway)  # the bridge learns B's MAC behind B's port
    ip_neigh = ["ip", "-n", node.netns, "neigh"]
    subprocess.run([*ip_neigh, "replace", a.ip, "lladdr", pod_mac(b), "dev", "cni0", "nud", "permanent"], check=True)
    try:
        with netns.entered(node.netns):
            rtnl = Rtnl()
        with rtnl:
            assert _fdb_port_hint(rtnl, ifindex(node.netns, "cni0"), a.ip) == ifindex(node.netns, b.host_ifname)
        assert host_ifname_for(a.ip, netns=node.netns) == a.host_ifname
        assert host_ifname_for(b.ip, netns=node.netns) == b.host_ifname
    finally:
        subprocess.run([*ip_neigh, "del", a.ip, "dev", "cni0"], check=False)


def test_lookup_errors_and_ports_that_lead_to_no_pod(lab: Lab) -> None:
    """Another node's pod and an unused subnet address are refused; a non-veth port (a tap) and a veth whose
    peer stays in the node's namespace are skipped."""
    node = lab.nodes[0]
    with pytest.raises(LookupError, match="not a local pod"):
        host_ifname_for(lab.pods[3].ip, netns=node.netns)
    with pytest.raises(LookupError, match=r"10\.200\.0\.99 is routed to bridge cni0 but none of its 3 ports"):
        host_ifname_for("10.200.0.99", netns=node.netns)
    ip = ["ip", "-n", node.netns, "link"]
    try:
        subprocess.run(["ip", "-n", node.netns, "tuntap", "add", "brcni-tap", "mode", "tap"], check=True)
        subprocess.run([*ip, "add", "brcni-va", "type", "veth", "peer", "name", "brcni-vb"], check=True)
        for dev in ("brcni-tap", "brcni-va"):
            subprocess.run([*ip, "set", dev, "master", "cni0", "up"], check=True)
        with pytest.raises(LookupError, match="none of its 5 ports"):
            host_ifname_for("10.200.0.99", netns=node.netns)
        for pod in lab.pods_of(node):
            assert host_ifname_for(pod.ip, netns=node.netns) == pod.host_ifname
    finally:
        for dev in ("brcni-tap", "brcni-va"):
            subprocess.run([*ip, "del", dev], check=False, capture_output=True)


def test_a_pod_set_up_later_is_found_and_a_removed_one_is_not(lab: Lab) -> None:
    """What the agent's reconcile meets: a pod whose veth is added after the others (the nsid is new to the
    node) is found at once; once its namespace is deleted, its address leads nowhere."""
    node = lab.nodes[0]
    ns, ip = f"{PREFIX}{lab.lab_id}-late", "10.200.0.77"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "-n", node.netns, "link", "add", "veth77", "type", "veth", "peer", "name", "eth0", "netns", ns],
            check=True,
        )
        subprocess.run(["ip", "-n", node.netns, "link", "set", "veth77", "master", "cni0", "up"], check=True)
        for cmd in (["addr", "add", f"{ip}/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        assert host_ifname_for(ip, netns=node.netns) == "veth77"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    # The namespace, and with it the veth pair, is dismantled asynchronously.
    eventually_sync(lambda: "veth77" not in {link["ifname"] for link in lab.links(node.netns)},
                    "veth77 gone with its namespace", 10, interval=0.05)
    with pytest.raises(LookupError, match="is routed to bridge cni0"):
        host_ifname_for(ip, netns=node.netns)
    assert [host_ifname_for(p.ip, netns=node.netns) for p in lab.pods_of(node)] == ["veth0", "veth1", "veth2"]


# -- capture on a bridge port ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capture(lab: Lab) -> Iterator[tuple[Redirector, TransparentRelay]]:
    """Node 0's Redirector (private bpffs, tcx or clsact) and a transparent relay in its namespace, echo servers
    on 8080 in every pod; pod A (node 0) is enrolled on the interface host_ifname_for names, B is hooked."""
    pytest.importorskip("bcc", reason="Debian's python3-bpfcc is not importable")
    node = lab.nodes[0]
    with contextlib.ExitStack() as running:  # unwound in reverse: the agent, the relay, the servers, the bpffs
        bpffs = running.enter_context(private_bpffs())
        for p in lab.pods:
            running.enter_context(EchoServer(p.netns, ports=(8080,)))
        relay = running.enter_context(TransparentRelay(node.netns))
        agent = Redirector(["eth0"], netns=node.netns, bpffs=bpffs).start()
        running.callback(agent.close)
        a, b = lab.pods[0], lab.pods[1]
        agent.enroll(a.ip, host_ifname_for(a.ip, netns=node.netns))
        agent.hook(host_ifname_for(b.ip, netns=node.netns))
        yield agent, relay


def test_inbound_from_another_node_to_a_bridge_attached_pod_is_captured(
    lab: Lab, capture: tuple[Redirector, TransparentRelay]
) -> None:
    agent, relay = capture
    a, d = lab.pods[0], lab.pods[3]
    assert agent.enrolled() == {a.ip: a.host_ifname}
    relay.accepted.clear()
    seen, direct = talk(d, a.ip)
    assert seen == d.ip and not direct  # relayed by node 0's relay, which connected to A as D
    accepted = relay.accepted
    assert [(x.listener_port, x.original_dst, x.peer[0], x.upstream_ok) for x in accepted] == [
        (15006, (a.ip, 8080), d.ip, True)
    ]


def test_outbound_from_a_bridge_attached_pod_is_captured(
    lab: Lab, capture: tuple[Redirector, TransparentRelay]
) -> None:
    _agent, relay = capture
    a, d = lab.pods[0], lab.pods[3]
    relay.accepted.clear()
    seen, direct = talk(a, d.ip, timeout=2.0)
    assert seen == a.ip and not direct and [x.listener_port for x in relay.accepted] == [15001]


def test_same_node_bridged_pods_are_captured(lab: Lab, capture: tuple[Redirector, TransparentRelay]) -> None:
    _agent, relay = capture
    a, b = lab.pods[0], lab.pods[1]
    relay.accepted.clear()
    assert talk(a, b.ip) == (a.ip, False)
    assert talk(b, a.ip) == (b.ip, False)
    assert sorted(x.listener_port for x in relay.accepted) == [15001, 15006]  # A's outbound, A's inbound


def talk_from_node(node: Node, dst_ip: str, port: int = 8080) -> tuple[str, bool]:
    (_ip, my_port), reply = exchange(node.netns, dst_ip, port, payload=b"hi", timeout=3.0)
    ip, port_seen = reply.split(b" ", 1)[0].removeprefix(b"peer=").decode().rsplit(":", 1)
    return ip, int(port_seen) == my_port


@contextlib.contextmanager
def dnat(node: Node, vip: str, to: str) -> Iterator[None]:
    """kube-proxy's ClusterIP DNAT of ``vip:80`` to ``to:8080`` in the node's namespace."""
    table = "ambit_test_dnat"
    rules = (f"table ip {table} {{\n chain pre {{\n type nat hook prerouting priority dstnat;\n"
             f" ip daddr {vip} tcp dport 80 dnat to {to}:8080\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", node.netns, "nft", "-f", "-"], input=rules, text=True, check=True,
                   timeout=10)
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "exec", node.netns, "nft", "delete", "table", "ip", table], check=False,
                       timeout=10)


def test_the_door_of_a_bridged_pod_takes_what_the_bridge_and_the_node_deliver(
    lab: Lab, capture: tuple[Redirector, TransparentRelay]
) -> None:
    """Paths into enrolled A that only A's door sees on a bridge CNI: a pod of the same bridge whose veth has no
    program (its frames switched straight to A's port), the node itself, and a Service VIP the node DNATs; each
    is captured on A's inbound listener with A as the destination. A pod that is not enrolled keeps its
    plain path (C from the node: direct)."""
    agent, relay = capture
    node, a, c = lab.nodes[0], lab.pods[0], lab.pods[2]
    relay.accepted.clear()
    assert talk(c, a.ip) == (c.ip, False)
    assert talk_from_node(node, a.ip) == (node.pod_gateway, False)
    with dnat(node, "10.96.77.1", a.ip):
        assert talk(c, "10.96.77.1", 80) == (c.ip, False)
    assert [(x.listener_port, x.original_dst, x.peer[0]) for x in relay.accepted] == [
        (15006, (a.ip, 8080), c.ip), (15006, (a.ip, 8080), node.pod_gateway), (15006, (a.ip, 8080), c.ip)]
    assert talk_from_node(node, c.ip) == (node.pod_gateway, True)
    assert agent.counters()["redirect_door"] >= 3


def test_reconcile_attaches_the_bridge_while_a_bridged_pod_is_wanted(
    lab: Lab, capture: tuple[Redirector, TransparentRelay]
) -> None:
    agent, _relay = capture
    node, a, b = lab.nodes[0], lab.pods[0], lab.pods[1]
    bridge = ifindex(node.netns, "cni0")

    def on_bridge() -> bool:
        return any(att.ifindex == bridge for att in agent.attachments())

    def door_settings() -> tuple[str, str]:  # where the door's captures re-enter the stack: the bridge
        return (sysctls.read(node.netns, "net/ipv4/conf/cni0/accept_local"),
                sysctls.read(node.netns, "net/ipv4/conf/cni0/rp_filter"))

    new_interface = (sysctls.read(node.netns, "net/ipv4/conf/default/accept_local"),
                     sysctls.read(node.netns, "net/ipv4/conf/default/rp_filter"))
    agent.reconcile({a.ip: host_ifname_for(a.ip, netns=node.netns)}, [host_ifname_for(b.ip, netns=node.netns)])
    assert on_bridge() and door_settings() == ("1", "0")
    agent.reconcile({}, [])
    assert not on_bridge() and door_settings() == new_interface
    agent.reconcile({a.ip: host_ifname_for(a.ip, netns=node.netns)}, [host_ifname_for(b.ip, netns=node.netns)])
    assert on_bridge() and talk(a, b.ip) == (a.ip, False) and door_settings() == ("1", "0")
