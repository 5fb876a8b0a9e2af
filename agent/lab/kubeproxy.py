"""The lab's kube-proxy: each node's nftables tables that send Service VIPs to endpoints, as kube-proxy does.

``ruleset(state, node, families)`` is a pure function from the mesh state (the agents' own Services and
endpoints) to the text of one ``nft -f`` transaction, shaped like kube-proxy's nftables mode: one table per IP
family, ``ip kube-proxy`` and (dual stack) ``ip6 kube-proxy``, the same rules in each for the Services' VIPs and
endpoints of that family (a dual-stack Service is in both; the IPv6 table's node ports are those on the node's
IPv6 addresses, ::1 excepted; its short cut for pods is the IPv6 pod range, its ICMP is ICMPv6):

* nat ``prerouting`` (pods' traffic arriving at the node) and ``output`` (the node's own processes):
  ``VIP:port`` is DNATed to a random endpoint ``podIP:targetPort`` (``numgen random mod N map``), TCP only;
* filter ``input``/``forward``/``output`` before NAT: a new connection to a Service port with no endpoint is
  rejected, as kube-proxy rejects it, but with a TCP reset where kube-proxy sends ICMP port unreachable. The
  client sees the same thing, connect() failing at once with "connection refused"; but the kernel rate-limits
  the ICMP it sends to one peer (``net.ipv4.icmp_ratelimit``: a burst of 6, then one a second), so from the
  7th refusal within a second on, kube-proxy's SYNs go unanswered and each connect() waits for the 1 s
  retransmission (measured in the lab); resets are not rate-limited. Other protocols get the ICMP.
  ``internalTrafficPolicy: Local`` without an endpoint on the node is dropped instead, as kube-proxy drops it;
* after NAT: a new connection to a VIP on a port no Service has is rejected the same way;
* a pod that reaches itself through a VIP is masqueraded (hairpin), or its reply would skip the NAT;
* node ports (NodePort and LoadBalancer Services): a TCP connection to ``<any address of the node>:nodePort``
  (``fib daddr type local``, 127.0.0.0/8 excepted: kube-proxy's nftables mode serves no node port on localhost,
  unlike its iptables mode with ``route_localnet``), from outside the node (prerouting) or from the node itself
  (output), is DNATed to an endpoint. ``externalTrafficPolicy: Cluster`` (the default): any endpoint, and the
  connection is masqueraded (mark bit 0x4000, kube-proxy's default ``--masquerade-bit`` 14, then ``masquerade
  fully-random`` after NAT), so the endpoint sees the address of the node that forwarded it. ``Local``: this
  node's endpoints only, the client's address kept; kube-proxy's two short cuts stay (``detect-local-mode``
  ClusterCIDR, the lab's pod range ``POD_SUPERNET``): a pod of the cluster goes to any endpoint unmasqueraded,
  the node itself to any endpoint masqueraded. Without an endpoint the connection is rejected (none at all) or
  dropped (Local, none on this node), before NAT, as for a VIP; so from the node itself (whose filter output
  chain runs before its NAT output chain) a Local node port without a local endpoint is dropped too.

Nothing here knows about Ambit: like kube-proxy, the table applies to every packet that reaches the node's
netfilter hooks, including those the agent's tc programs have already steered to its listeners (tc ingress
runs before netfilter, but a socket assignment does not exempt a packet from netfilter's NAT). The agent
has to keep its steered packets out of conntrack NAT, as it has to on a real node.

Every node's tables are replaced whole in one transaction (``add``/``delete``/define): a packet sees the old
table or the new one. Connections already made keep their endpoint (conntrack).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from agent.capture import netns
from agent.lab.runtime import LabError
from agent.lab.topology import POD_SUPERNET, POD_SUPERNET6
from agent.mesh.model import Endpoint, Preference, ip_family
from agent.mesh.store import MeshState

TABLE = "kube-proxy"
MASQUERADE_MARK = 0x4000  # kube-proxy's --masquerade-bit 14
Backends = tuple[tuple[str, int], ...]  # (ip, target port), sorted


@dataclass(frozen=True)
class Family:
    """What the tables of one IP family spell differently."""

    version: int
    nft: str  # the nftables family and address expression: ip, ip6
    address_type: str
    localhost: str
    pod_range: str  # kube-proxy's ClusterCIDR of this family (detect-local-mode)
    unreachable: str  # the ICMP of a refusal of another protocol than TCP

    @property
    def node_address(self) -> str:
        """kube-proxy's node ports: any address of the node but localhost."""
        return f"fib daddr type local {self.nft} daddr != {self.localhost}"


IPV4 = Family(4, "ip", "ipv4_addr", "127.0.0.0/8", str(POD_SUPERNET), "icmp type port-unreachable")
IPV6 = Family(6, "ip6", "ipv6_addr", "::1", str(POD_SUPERNET6), "icmpv6 type port-unreachable")


def families(dual_stack: bool) -> tuple[Family, ...]:
    return (IPV4, IPV6) if dual_stack else (IPV4,)


@dataclass(frozen=True)
class Frontend:
    """One ``VIP:port`` of a Service and the endpoints (``(ip, target port)``, sorted) it goes to on a node."""

    service: str  # "ns/name"
    vip: str
    port: int
    backends: Backends
    local_only: bool = False  # internalTrafficPolicy: Local

    @property
    def element(self) -> str:
        return f"{self.vip} . tcp . {self.port}"


def _endpoints(state: MeshState, key: str, family: Family) -> list[Endpoint]:
    return [ep for ep in state.endpoints.get(key, {}).values() if ip_family(ep.ip) == family.version]


def _backends(endpoints: Sequence[Endpoint], port: int) -> Backends:
    return tuple(sorted((ep.ip, ep.ports[port]) for ep in endpoints if port in ep.ports))


def frontends(state: MeshState, node: str, family: Family = IPV4) -> list[Frontend]:
    """Every ``VIP:port`` of ``family`` of the state's Services with its endpoints as seen from ``node``."""
    found = []
    for key in sorted(state.services):
        svc = state.services[key]
        local = svc.preference is Preference.NODE_ONLY
        endpoints = [ep for ep in _endpoints(state, key, family) if not local or ep.node == node]
        for vip in (v for v in svc.vips if ip_family(v) == family.version):
            for port in sorted(svc.ports, key=lambda p: p.port):
                found.append(Frontend(key, vip, port.port, _backends(endpoints, port.port), local))
    return found


@dataclass(frozen=True)
class NodePort:
    """One node port of a Service, with its endpoints: all of them, and those on the node."""

    service: str  # "ns/name"
    port: int  # the Service port
    node_port: int
    backends: Backends
    local: Backends
    external_local: bool = False  # externalTrafficPolicy: Local
    family: Family = IPV4

    @property
    def comment(self) -> str:
        return f"{self.service}:{self.port} nodePort {self.node_port}"

    def rules(self) -> list[str]:
        """The rules of the node-ports chain (first match wins: DNAT ends the chain)."""
        if not self.backends:
            return []
        start, masquerade = f"tcp dport {self.node_port}", f"meta mark set meta mark or {MASQUERADE_MARK:#x}"
        family, dnat = self.family, _dnat(self.backends, self.family)
        if not self.external_local:
            return [f"{start} {masquerade} {dnat} comment \"{self.comment}\""]
        rules = [f"{start} {family.nft} saddr {family.pod_range} {dnat} comment \"{self.comment}: a pod\"",
                 f"{start} fib saddr type local {masquerade} {dnat} comment \"{self.comment}: the node\""]
        local = f"{start} {_dnat(self.local, family)} comment \"{self.comment}\""
        return rules + ([local] if self.local else [])

    @property
    def no_endpoint(self) -> str | None:
        """The verdict on a new connection before NAT when there is no endpoint to go to, if none."""
        if not self.backends:
            return "goto reject-chain"
        return "drop" if self.external_local and not self.local else None


def node_ports(state: MeshState, node: str, family: Family = IPV4) -> list[NodePort]:
    """Every node port of the state's Services of ``family``, by number, with its endpoints of that family as seen
    from ``node``."""
    found = []
    for key in sorted(state.services):
        svc = state.services[key]
        if family.version not in map(ip_family, svc.vips):
            continue
        endpoints = _endpoints(state, key, family)
        here = [ep for ep in endpoints if ep.node == node]
        found += [NodePort(key, p.port, p.node_port, _backends(endpoints, p.port), _backends(here, p.port),
                           svc.external_local, family) for p in svc.ports if p.node_port]
    return sorted(found, key=lambda n: n.node_port)


def _dnat(backends: Backends, family: Family) -> str:
    choices = ", ".join(f"{i} : {ip} . {port}" for i, (ip, port) in enumerate(backends))
    return f"dnat {family.nft} to numgen random mod {len(backends)} map {{ {choices} }}"


def _elements(items: Sequence[str]) -> list[str]:
    return [f"\t\telements = {{ {', '.join(items)} }}"] if items else []


def ruleset(state: MeshState, node: str, families: Sequence[Family] = (IPV4,)) -> str:
    """The ``nft -f`` text that makes ``node``'s kube-proxy tables (one per family) match ``state``."""
    return "".join(_table(state, node, family) for family in families)


def _table(state: MeshState, node: str, family: Family) -> str:
    fronts, ports = frontends(state, node, family), node_ports(state, node, family)
    served = [f for f in fronts if f.backends]
    empty = [f"{f.element} : {'drop' if f.local_only else 'goto reject-chain'}" for f in fronts if not f.backends]
    empty_ports = [f"tcp . {n.node_port} : {n.no_endpoint}" for n in ports if n.no_endpoint]
    vips = sorted({f.vip for f in fronts}, key=ipaddress.ip_address)
    hairpin = sorted({f"{ip} . {ip}" for backends in [*(f.backends for f in served), *(n.backends for n in ports)]
                      for ip, _port in backends})
    ip, table = family.nft, f"{family.nft} {TABLE}"
    rules = [f'\t\t{ip} daddr {f.vip} tcp dport {f.port} {_dnat(f.backends, family)} comment "{f.service}:{f.port}"'
             for f in served]
    lines = [
        f"# the lab's kube-proxy on {node} (agent/lab/kubeproxy.py): {len(served)} served and "
        f"{len(fronts) - len(served)} empty Service port(s), {len(ports)} node port(s)",
        f"add table {table}",
        f"delete table {table}",
        f"table {table} {{",
        "\tset cluster-ips {", f"\t\ttype {family.address_type}", *_elements(vips), "\t}",
        "\tmap no-endpoint-services {", f"\t\ttype {family.address_type} . inet_proto . inet_service : verdict",
        *_elements(empty), "\t}",
        "\tmap no-endpoint-nodeports {", "\t\ttype inet_proto . inet_service : verdict", *_elements(empty_ports),
        "\t}",
        "\tset hairpin {", f"\t\ttype {family.address_type} . {family.address_type}", *_elements(hairpin), "\t}",
        "\tchain reject-chain {", "\t\tmeta l4proto tcp reject with tcp reset",
        f"\t\treject with {family.unreachable}", "\t}",
        "\tchain service-endpoints-check {", f"\t\t{ip} daddr . meta l4proto . th dport vmap @no-endpoint-services",
        f"\t\t{family.node_address} meta l4proto . th dport vmap @no-endpoint-nodeports", "\t}",
        "\tchain cluster-ips-check {", f"\t\t{ip} daddr @cluster-ips goto reject-chain", "\t}",
        *_base_chain("filter-input", "filter hook input priority -110",
                     ["ct state new jump service-endpoints-check"]),
        *_base_chain("filter-forward", "filter hook forward priority -110",
                     ["ct state new jump service-endpoints-check", "ct state new jump cluster-ips-check"]),
        *_base_chain("filter-output", "filter hook output priority -110",
                     ["ct state new jump service-endpoints-check"]),
        *_base_chain("filter-output-post-dnat", "filter hook output priority -90",
                     ["ct state new jump cluster-ips-check"]),
        *_base_chain("nat-prerouting", "nat hook prerouting priority -100", ["jump services"]),
        *_base_chain("nat-output", "nat hook output priority -100", ["jump services"]),
        *_base_chain("nat-postrouting", "nat hook postrouting priority 100", [
            f"meta mark & {MASQUERADE_MARK:#x} != 0 meta mark set meta mark xor {MASQUERADE_MARK:#x} "
            "masquerade fully-random",
            f"ct status dnat {ip} saddr . {ip} daddr @hairpin masquerade"]),
        "\tchain services {", *rules, f"\t\t{family.node_address} jump nodeports", "\t}",
        "\tchain nodeports {", *(f"\t\t{rule}" for n in ports for rule in n.rules()), "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _base_chain(name: str, hook: str, rules: Sequence[str]) -> list[str]:
    return [f"\tchain {name} {{", f"\t\ttype {hook}; policy accept;", *(f"\t\t{r}" for r in rules), "\t}"]


def install(node_netns: str, text: str) -> None:
    """Load a ruleset into a node's namespace (one transaction); LabError with nft's message if refused."""
    res = netns.run(node_netns, ["nft", "-f", "-"], input=text, check=False, timeout=30)
    if res.returncode != 0:
        raise LabError(f"nft refused the kube-proxy table of {node_netns}: {res.stderr.strip()}")
