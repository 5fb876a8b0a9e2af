"""A lab cluster made of network namespaces: nodes on a shared "physical" L2 network, pods behind veths.

Layout for a lab with id X (names are `<prefix><X>-...`, so parallel labs never collide):

    <prefix>X-sw            switch namespace: bridge br0 plus one port per node (n0, n1, ...)
    <prefix>X-n<i>          node i: uplink eth0 = 192.168.200.(10+i)/24 on the switch,
                            pod CIDR 10.200.i.0/24, a host-side veth lxc<k> per local pod,
                            ip_forward on, a route to every other node's pod CIDR via that node,
                            and the Service CIDR 10.96.0.0/16 (dual stack: and fd00:96::/112)
                            routed on the uplink
    <prefix>X-n<i>p<k>      pod k of node i: eth0 = 10.200.i.(10+k)/32, default route via the
                            link-local gateway 169.254.1.1 whose MAC is the node-side veth's
                            (fixed ee:ee:ee:ee:ee:ee, as Calico does; a permanent neighbour entry)

Bridge mode (`Lab.up(..., bridge=True)`, like minikube's default `bridge` CNI plugin or Flannel's cni0):
each node has a bridge `cni0` holding the pod CIDR's gateway 10.200.i.1/24 (fixed MAC), so the node's
route to its pods is the connected `10.200.i.0/24 dev cni0`; a pod's host-side veth `veth<k>` (kernel-chosen
MAC) is a port of cni0 with hairpin mode on (as the plugin's `hairpinMode: true`); pod k has
eth0 = 10.200.i.(10+k)/24 and a default route via 10.200.i.1. Pods of one node reach each other at L2
through the bridge; nodes route the other nodes' pod CIDRs as in the default layout.

Dual stack (`Lab.up(..., dual_stack=True)`): every node and pod gets an IPv6 address beside its IPv4 one,
spelled to match it: node i's uplink fd00:192:168::(10+i)/64, pod CIDR fd00:200:i::/64, pod k
fd00:200:i::(10+k) (the decimal digits of the IPv4 address, read as hex: 10.200.1.11 is fd00:200:1::11).
Routed layout: the pod's /128 is routed on its veth like the IPv4 /32, and the pod's IPv6 default route is via
fe80::ecee:eeff:feee:eeee (the link-local address of the host veth's MAC, as Calico does), a permanent neighbour
entry; bridge layout: cni0 holds fd00:200:i::1/64 and the pods' /64 addresses route via it. Nodes forward IPv6
and route every other node's IPv6 pod CIDR via that node's IPv6 address. Addresses are added without duplicate
address detection and router solicitations are off, so the addresses work at once and the wire stays quiet
(neighbour discovery and MLD remain). The IPv6 Service range fd00:96::/112 is routed on the uplink like the
IPv4 one.

Addresses are private and exist only inside the lab's namespaces. Without dual stack, IPv6 is disabled
everywhere to keep the wire quiet. `down()` deletes every namespace the lab made (links, routes and rules die
with them), also after a partial `up()`, and sweeps any namespace carrying the lab's id.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from agent.capture import netns

GATEWAY_IP = "169.254.1.1"
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"
NODE_NET = ipaddress.IPv4Network("192.168.200.0/24")
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")  # ClusterIPs (kube-apiserver's default range)
SERVICE_CIDR6 = ipaddress.IPv6Network("fd00:96::/112")  # dual stack: the IPv6 ClusterIPs (a /112, as kind's)
POD_SUPERNET = ipaddress.IPv4Network("10.200.0.0/16")
NODE_NET6 = ipaddress.IPv6Network("fd00:192:168::/64")
POD_SUPERNET6 = ipaddress.IPv6Network("fd00:200::/32")  # node i: fd00:200:i::/64
GATEWAY_IP6 = "fe80::ecee:eeff:feee:eeee"  # the EUI-64 link-local address of HOST_VETH_MAC
POD_BRIDGE = "cni0"
UPLINK = "eth0"
P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Node:
    """A node: a network namespace with an uplink on the lab's switch and a pod CIDR."""

    index: int
    netns: str
    ip: str
    uplink: str
    pod_cidr: str
    bridge: str | None = None  # bridge mode: the pod bridge (its address is the pods' gateway)
    ip6: str = ""  # dual stack: the uplink's IPv6 address ("" without)
    pod_cidr6: str = ""  # dual stack: the IPv6 pod CIDR

    @property
    def pod_gateway(self) -> str:
        """Pods' next hop: the bridge's address (first of the pod CIDR) in bridge mode, else 169.254.1.1."""
        if self.bridge is None:
            return GATEWAY_IP
        return str(ipaddress.IPv4Network(self.pod_cidr).network_address + 1)

    @property
    def pod_gateway6(self) -> str:
        """Pods' IPv6 next hop: the bridge's fd00:200:i::1 in bridge mode, else the host veth's link-local."""
        if self.bridge is None:
            return GATEWAY_IP6
        return str(ipaddress.IPv6Network(self.pod_cidr6).network_address + 1)


@dataclass(frozen=True)
class Pod:
    """A pod: a network namespace whose eth0 is paired with `host_ifname` in its node's namespace."""

    index: int
    netns: str
    ip: str
    node: Node
    host_ifname: str
    ifname: str = "eth0"
    ip6: str = ""  # dual stack: the pod's IPv6 address ("" without)


def mirrored(n: int) -> int:
    """The IPv6 group spelled with ``n``'s decimal digits (11 -> 0x11), so that IPv6 addresses read like the
    IPv4 ones they stand beside."""
    return int(str(n), 16)


def _bridge_mac(node_index: int) -> str:
    """A fixed, locally administered MAC for node i's pod bridge: a bridge without an explicit address takes
    its lowest port's, which changes as pods come and go (and the pods' ARP entries of the gateway go stale)."""
    return f"02:ab:00:00:{node_index:02x}:01"


def _ip_batch(ns: str | None, commands: Sequence[str]) -> None:
    """Run `ip` commands in one process (fast); raise with ip's own message on failure."""
    argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
    res = subprocess.run(
        argv, check=False, input="\n".join(commands) + "\n", text=True, capture_output=True, timeout=30
    )
    if res.returncode != 0:
        raise RuntimeError(f"ip -batch in {ns or 'root ns'} failed: {res.stderr.strip()}")


@dataclass
class Lab:
    """A running lab; build with `Lab.up()`, tear down with `down()` or a `with` block."""

    lab_id: str
    prefix: str
    switch: str
    nodes: list[Node] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    bridge: bool = False  # bridge mode (see the module docstring)
    dual_stack: bool = False  # IPv6 addresses beside the IPv4 ones (see the module docstring)

    @classmethod
    def up(cls, nodes: int = 2, pods_per_node: int = 2, prefix: str = "ambit-", *, bridge: bool = False,
           dual_stack: bool = False) -> Lab:
        """Create the lab (`bridge=True`: pods on a per-node cni0 bridge instead of /32 routes; `dual_stack=True`:
        IPv6 too); on any failure everything made so far is removed before the error propagates."""
        if not 1 <= nodes <= 200 or not 0 <= pods_per_node <= 200:
            raise ValueError("nodes must be 1..200 and pods_per_node 0..200")
        lab_id = secrets.token_hex(3)
        base = f"{prefix}{lab_id}"
        lab = cls(lab_id=lab_id, prefix=prefix, switch=f"{base}-sw", bridge=bridge, dual_stack=dual_stack)
        try:
            lab._build(base, nodes, pods_per_node)
        except BaseException:
            lab.down()
            raise
        return lab

    # -- construction -------------------------------------------------------------------------------
    def _add_netns(self, name: str, ipv6: bool = False) -> None:
        """A namespace, IPv6 off unless ``ipv6`` (then on, quiet: no duplicate address detection, no router
        solicitations or advertisements taken; set before any interface exists, so every one inherits it)."""
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        self.created.append(name)
        settings = {"disable_ipv6": "0", "accept_dad": "0", "router_solicitations": "0", "accept_ra": "0"} \
            if ipv6 else {"disable_ipv6": "1"}
        for scope in ("all", "default"):
            for key, value in settings.items():
                netns.sysctl_write(name, f"net.ipv6.conf.{scope}.{key}", value)

    def _build(self, base: str, n_nodes: int, pods_per_node: int) -> None:
        self._add_netns(self.switch)
        sw_cmds = ["link add br0 type bridge", "link set br0 up"]
        hosts = list(NODE_NET.hosts())
        v6 = self.dual_stack
        for i in range(n_nodes):
            name = f"{base}-n{i}"
            self._add_netns(name, ipv6=v6)
            pod_cidr = ipaddress.IPv4Network((int(POD_SUPERNET.network_address) + (i << 8), 24))
            pod_cidr6 = ipaddress.IPv6Network((int(POD_SUPERNET6.network_address) + (mirrored(i) << 80), 64))
            node = Node(
                index=i,
                netns=name,
                ip=str(hosts[9 + i]),
                uplink=UPLINK,
                pod_cidr=str(pod_cidr),
                bridge=POD_BRIDGE if self.bridge else None,
                ip6=str(NODE_NET6.network_address + mirrored(10 + i)) if v6 else "",
                pod_cidr6=str(pod_cidr6) if v6 else "",
            )
            self.nodes.append(node)
            sw_cmds += [
                f"link add n{i} type veth peer name {UPLINK} netns {name}",
                f"link set n{i} master br0",
                f"link set n{i} up",
            ]
        _ip_batch(self.switch, sw_cmds)

        for node in self.nodes:
            netns.sysctl_write(node.netns, "net.ipv4.ip_forward", "1")
            if v6:
                netns.sysctl_write(node.netns, "net.ipv6.conf.all.forwarding", "1")
            cmds = [
                "link set lo up",
                f"addr add {node.ip}/{NODE_NET.prefixlen} dev {UPLINK}",
                *([f"addr add {node.ip6}/{NODE_NET6.prefixlen} dev {UPLINK} nodad"] if v6 else []),
                f"link set {UPLINK} up",
            ]
            for other in self.nodes:
                if other is not node:
                    cmds.append(f"route add {other.pod_cidr} via {other.ip} dev {UPLINK}")
                    if v6:
                        cmds.append(f"route add {other.pod_cidr6} via {other.ip6} dev {UPLINK}")
            # Service VIPs are routable from the node, as a Kubernetes node's default route makes them (Kubernetes
            # requires one); the capture programs treat a destination the node cannot route as a local one.
            cmds.append(f"route add {SERVICE_CIDR} dev {UPLINK}")
            if v6:
                cmds.append(f"route add {SERVICE_CIDR6} dev {UPLINK}")
            pod_net = ipaddress.IPv4Network(node.pod_cidr)
            if node.bridge is not None:
                cmds += [
                    f"link add {node.bridge} address {_bridge_mac(node.index)} type bridge",
                    f"addr add {node.pod_gateway}/{pod_net.prefixlen} dev {node.bridge}",
                    *([f"addr add {node.pod_gateway6}/64 dev {node.bridge} nodad"] if v6 else []),
                    f"link set {node.bridge} up",
                ]
            for k in range(pods_per_node):
                pod = Pod(
                    index=len(self.pods),
                    netns=f"{base}-n{node.index}p{k}",
                    ip=str(pod_net.network_address + 10 + k),
                    node=node,
                    host_ifname=f"veth{k}" if node.bridge is not None else f"lxc{k}",
                    ip6=str(ipaddress.IPv6Network(node.pod_cidr6).network_address + mirrored(10 + k)) if v6 else "",
                )
                self._add_netns(pod.netns, ipv6=v6)
                self.pods.append(pod)
                if node.bridge is not None:
                    cmds += [
                        f"link add {pod.host_ifname} type veth peer name {pod.ifname} netns {pod.netns}",
                        f"link set {pod.host_ifname} master {node.bridge}",
                        f"link set {pod.host_ifname} type bridge_slave hairpin on",
                        f"link set {pod.host_ifname} up",
                    ]
                else:
                    cmds += [
                        f"link add {pod.host_ifname} address {HOST_VETH_MAC} type veth "
                        f"peer name {pod.ifname} netns {pod.netns}",
                        f"link set {pod.host_ifname} up",
                        f"route add {pod.ip}/32 dev {pod.host_ifname} scope link src {node.ip}",
                        *([f"route add {pod.ip6}/128 dev {pod.host_ifname}"] if v6 else []),
                    ]
            _ip_batch(node.netns, cmds)
            for pod in self.pods_of(node):
                _ip_batch(pod.netns, ["link set lo up", *self._pod_commands(pod)])

    @staticmethod
    def _pod_commands(pod: Pod) -> list[str]:
        gateway, gateway6 = pod.node.pod_gateway, pod.node.pod_gateway6 if pod.ip6 else ""
        if pod.node.bridge is not None:
            prefixlen = ipaddress.IPv4Network(pod.node.pod_cidr).prefixlen
            return [
                f"addr add {pod.ip}/{prefixlen} dev {pod.ifname}",
                *([f"addr add {pod.ip6}/64 dev {pod.ifname} nodad"] if pod.ip6 else []),
                f"link set {pod.ifname} up",
                f"route add default via {gateway} dev {pod.ifname} src {pod.ip}",
                *([f"route add ::/0 via {gateway6} dev {pod.ifname} src {pod.ip6}"] if pod.ip6 else []),
            ]
        return [
            f"addr add {pod.ip}/32 dev {pod.ifname}",
            *([f"addr add {pod.ip6}/128 dev {pod.ifname} nodad"] if pod.ip6 else []),
            f"link set {pod.ifname} up",
            f"route add {gateway} dev {pod.ifname} scope link",
            f"route add default via {gateway} dev {pod.ifname} src {pod.ip}",
            f"neigh add {gateway} lladdr {HOST_VETH_MAC} dev {pod.ifname} nud permanent",
            *([f"route add ::/0 via {gateway6} dev {pod.ifname} src {pod.ip6}",
               f"neigh add {gateway6} lladdr {HOST_VETH_MAC} dev {pod.ifname} nud permanent"] if pod.ip6 else []),
        ]

    # -- queries --------------------------------------------------------------------------------------
    def pods_of(self, node: Node) -> list[Pod]:
        """Pods placed on `node`."""
        return [p for p in self.pods if p.node == node]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this lab created, in creation order."""
        return list(self.created)

    # -- running things inside -----------------------------------------------------------------------
    def exec(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run a command in one of the lab's namespaces (`ip netns exec`)."""
        return netns.run(ns, argv, **kwargs)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command in one of the lab's namespaces; the caller must wait/kill it."""
        return netns.popen(ns, argv, **kwargs)

    def call(self, ns: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call a Python function with this thread inside namespace `ns`."""
        with netns.entered(ns):
            return fn(*args, **kwargs)

    def links(self, ns: str) -> list[dict[str, Any]]:
        """`ip -j link` of a namespace (for checks)."""
        out = netns.run(None, ["ip", "-n", ns, "-j", "link", "show"]).stdout
        return list(json.loads(out or "[]"))

    # -- teardown -------------------------------------------------------------------------------------
    def down(self) -> None:
        """Remove every namespace of this lab (idempotent; tolerates half-built labs)."""
        base = f"{self.prefix}{self.lab_id}-"
        doomed = list(dict.fromkeys([*reversed(self.created), *(n for n in netns.list_netns() if n.startswith(base))]))
        errors: list[str] = []
        for name in doomed:
            res = subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, text=True, timeout=10)
            if res.returncode != 0 and name in netns.list_netns():
                errors.append(f"{name}: {res.stderr.strip()}")
        self.created.clear()
        if errors:
            raise RuntimeError("lab teardown left namespaces behind: " + "; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(RuntimeError) if exc is not None else contextlib.nullcontext():
            self.down()
