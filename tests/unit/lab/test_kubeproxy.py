"""The lab's kube-proxy ruleset, rendered from cluster states (table tests of the pure function), and checked by
nft itself (root: in a network namespace the test makes)."""

from __future__ import annotations

import secrets
import subprocess
from typing import Any

import pytest

from agent.lab import kubeproxy, services
from agent.lab.runtime import LabError
from tests.fixtures.machine import needs_root
from tests.unit.lab import objects as o

NODE = "node-1"
WEB = {"app": "web"}


def render(*objs: dict[str, Any], node: str = NODE) -> str:
    mesh, errors = services.mesh_state([o.namespace("default"), o.namespace("shop"), *objs])
    assert errors == []
    return kubeproxy.ruleset(mesh, node)


def elements(text: str, block: str) -> list[str]:
    """The elements of a set or map of the rendered table (by its opening line)."""
    lines = text.splitlines()
    start = lines.index(f"\t{block} {{")
    end = lines.index("\t}", start)
    found = [line.strip() for line in lines[start:end] if line.strip().startswith("elements = { ")]
    return found[0].removeprefix("elements = { ").removesuffix(" }").split(", ") if found else []


def chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {name} {{")
    return [line.strip() for line in lines[start + 1:lines.index("\t}", start)]]


def dnat_rules(text: str) -> list[str]:
    """The VIPs' rules: the services chain but its last rule, the jump to the node ports."""
    *rules, last = chain(text, "services")
    assert last in (f"{f.node_address} jump nodeports" for f in (kubeproxy.IPV4, kubeproxy.IPV6)), last
    return rules


def web(**spec: Any) -> dict[str, Any]:
    return o.service("web", selector=WEB, clusterIP="10.96.0.10", **spec)


NP80 = {"port": 80, "targetPort": 8080, "nodePort": 30080}
MASQ = "meta mark set meta mark or 0x4000"
ALL3 = "0 : 10.200.0.10 . 8080, 1 : 10.200.0.11 . 8080, 2 : 10.200.1.10 . 8080"
VIP80 = f'ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 3 map {{ {ALL3} }} comment "default/web:80"'
THREE = (o.pod("a", "10.200.0.11", app="web"), o.pod("b", "10.200.1.10", "node-2", app="web"),
         o.pod("c", "10.200.0.10", app="web"), o.pod("other", "10.200.0.12", app="db"))

CASES: list[tuple[str, tuple[dict[str, Any], ...], str, dict[str, list[str]]]] = [
    ("no Service: an empty table", (), NODE,
     {"rules": [], "set cluster-ips": [], "map no-endpoint-services": [], "set hairpin": []}),
    ("three endpoints on two nodes, sorted, picked at random", (*THREE, web()), NODE, {
        "rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 3 map { 0 : 10.200.0.10 . 8080, '
                  '1 : 10.200.0.11 . 8080, 2 : 10.200.1.10 . 8080 } comment "default/web:80"'],
        "set cluster-ips": ["10.96.0.10"], "map no-endpoint-services": [],
        "set hairpin": ["10.200.0.10 . 10.200.0.10", "10.200.0.11 . 10.200.0.11", "10.200.1.10 . 10.200.1.10"]}),
    ("an unready pod is no endpoint", (o.pod("a", "10.200.0.10", app="web"),
                                       o.pod("b", "10.200.0.11", ready=False, app="web"), web()), NODE, {
        "rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.200.0.10 . 8080 } '
                  'comment "default/web:80"']}),
    ("... unless the Service publishes not-ready addresses",
     (o.pod("b", "10.200.0.11", ready=False, app="web"), web(publishNotReadyAddresses=True)), NODE, {
         "rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.200.0.11 . 8080 } '
                   'comment "default/web:80"']}),
    ("a named target port, per pod; a pod without it serves nothing on that port",
     (o.pod("a", "10.200.0.10", ports={"http": 8080}, app="web"), o.pod("b", "10.200.0.11", ports={"http": 9090},
                                                                        app="web"),
      o.pod("c", "10.200.0.12", app="web"), web(ports=[{"port": 80, "targetPort": "http"}])), NODE, {
         "rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 2 map { 0 : 10.200.0.10 . 8080, '
                   '1 : 10.200.0.11 . 9090 } comment "default/web:80"']}),
    ("two ports, two rules; UDP is not the mesh's", (THREE[0], web(ports=[
        {"port": 443, "targetPort": 8443}, {"port": 80, "targetPort": 8080, "name": "http"},
        {"port": 53, "protocol": "UDP"}])), NODE, {
        "rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.200.0.11 . 8080 } '
                  'comment "default/web:80"',
                  'ip daddr 10.96.0.10 tcp dport 443 dnat ip to numgen random mod 1 map { 0 : 10.200.0.11 . 8443 } '
                  'comment "default/web:443"']}),
    ("no endpoint: rejected, no rule", (THREE[3], web()), NODE, {
        "rules": [], "set cluster-ips": ["10.96.0.10"],
        "map no-endpoint-services": ["10.96.0.10 . tcp . 80 : goto reject-chain"], "set hairpin": []}),
    ("internalTrafficPolicy Local: this node's endpoints only", (*THREE, web(internalTrafficPolicy="Local")), "node-2",
     {"rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.200.1.10 . 8080 } '
                'comment "default/web:80"'], "map no-endpoint-services": []}),
    ("... and none on the node: dropped, as kube-proxy drops it",
     (THREE[1], web(internalTrafficPolicy="Local")), NODE,
     {"rules": [], "map no-endpoint-services": ["10.96.0.10 . tcp . 80 : drop"]}),
    ("headless: nothing to do", (*THREE, o.service("web", selector=WEB, clusterIP="None")), NODE,
     {"rules": [], "set cluster-ips": [], "map no-endpoint-services": []}),
    ("a Service without selector takes its EndpointSlices", (
        o.service("ext", ports=[{"port": 5432}], clusterIP="10.96.0.20"),
        o.endpoint_slice("ext-1", "ext", [("10.200.1.50", "node-2"), ("10.200.0.50", NODE)], 6432)), NODE, {
        "rules": ['ip daddr 10.96.0.20 tcp dport 5432 dnat ip to numgen random mod 2 map { 0 : 10.200.0.50 . 6432, '
                  '1 : 10.200.1.50 . 6432 } comment "default/ext:5432"']}),
    ("Services in key order, VIPs in address order", (
        THREE[0], o.service("b", "shop", selector=WEB, clusterIP="10.96.0.9"),
        o.service("a", "shop", selector=WEB, clusterIP="10.96.0.11"), web()), NODE, {
        "rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.200.0.11 . 8080 } '
                  'comment "default/web:80"'],
        "set cluster-ips": ["10.96.0.9", "10.96.0.10", "10.96.0.11"],
        "map no-endpoint-services": ["10.96.0.11 . tcp . 80 : goto reject-chain",
                                     "10.96.0.9 . tcp . 80 : goto reject-chain"]}),
    # -- node ports --
    ("a NodePort Service: any endpoint, masqueraded", (*THREE, web(type="NodePort", ports=[NP80])), NODE, {
        "rules": [VIP80], "nodeports": [
            f"tcp dport 30080 {MASQ} dnat ip to numgen random mod 3 map {{ {ALL3} }} "
            'comment "default/web:80 nodePort 30080"'],
        "map no-endpoint-nodeports": []}),
    ("externalTrafficPolicy Local: this node's endpoints, the client's address kept; pods and the node itself "
     "go to any endpoint (kube-proxy's short cuts)",
     (*THREE, web(type="NodePort", externalTrafficPolicy="Local", ports=[NP80])), "node-2", {
         "nodeports": [
             f"tcp dport 30080 ip saddr 10.200.0.0/16 dnat ip to numgen random mod 3 map {{ {ALL3} }} "
             'comment "default/web:80 nodePort 30080: a pod"',
             f"tcp dport 30080 fib saddr type local {MASQ} dnat ip to numgen random mod 3 map {{ {ALL3} }} "
             'comment "default/web:80 nodePort 30080: the node"',
             "tcp dport 30080 dnat ip to numgen random mod 1 map { 0 : 10.200.1.10 . 8080 } "
             'comment "default/web:80 nodePort 30080"'],
         "map no-endpoint-nodeports": []}),
    ("... and none on the node: dropped before NAT but for the short cuts",
     (THREE[1], web(type="LoadBalancer", externalTrafficPolicy="Local", ports=[NP80])), NODE, {
         "nodeports": [
             "tcp dport 30080 ip saddr 10.200.0.0/16 dnat ip to numgen random mod 1 map { 0 : 10.200.1.10 . 8080 } "
             'comment "default/web:80 nodePort 30080: a pod"',
             f"tcp dport 30080 fib saddr type local {MASQ} dnat ip to numgen random mod 1 map "
             '{ 0 : 10.200.1.10 . 8080 } comment "default/web:80 nodePort 30080: the node"'],
         "map no-endpoint-nodeports": ["tcp . 30080 : drop"]}),
    ("a node port without any endpoint: rejected", (THREE[3], web(type="NodePort", ports=[NP80])), NODE, {
        "rules": [], "nodeports": [], "map no-endpoint-nodeports": ["tcp . 30080 : goto reject-chain"],
        "map no-endpoint-services": ["10.96.0.10 . tcp . 80 : goto reject-chain"]}),
    ("node ports in number order; internalTrafficPolicy narrows the VIP only, the hairpins cover both",
     (*THREE, web(type="NodePort", internalTrafficPolicy="Local",
                  ports=[{"port": 443, "targetPort": 8443, "nodePort": 30443}, NP80])), "node-2", {
         "rules": ['ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 1 map { 0 : 10.200.1.10 . 8080 } '
                   'comment "default/web:80"',
                   'ip daddr 10.96.0.10 tcp dport 443 dnat ip to numgen random mod 1 map { 0 : 10.200.1.10 . 8443 } '
                   'comment "default/web:443"'],
         "nodeports": [
             f"tcp dport 30080 {MASQ} dnat ip to numgen random mod 3 map {{ {ALL3} }} "
             'comment "default/web:80 nodePort 30080"',
             f"tcp dport 30443 {MASQ} dnat ip to numgen random mod 3 map {{ {ALL3.replace('8080', '8443')} }} "
             'comment "default/web:443 nodePort 30443"'],
         "set hairpin": ["10.200.0.10 . 10.200.0.10", "10.200.0.11 . 10.200.0.11", "10.200.1.10 . 10.200.1.10"]}),
    ("a ClusterIP Service has no node port", (*THREE, web()), NODE,
     {"nodeports": [], "map no-endpoint-nodeports": []}),
]


@pytest.mark.parametrize(("objs", "node", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_ruleset(objs: tuple[dict[str, Any], ...], node: str, expected: dict[str, list[str]]) -> None:
    text = render(*objs, node=node)
    for block, want in expected.items():
        got = dnat_rules(text) if block == "rules" else chain(text, block) if block == "nodeports" else \
            elements(text, block)
        assert got == want, block


def test_the_table_is_replaced_whole_and_hooks_where_kube_proxy_does() -> None:
    text = render(*THREE, web())
    lines = text.splitlines()
    assert lines[1:4] == ["add table ip kube-proxy", "delete table ip kube-proxy", "table ip kube-proxy {"]
    hooks = [line.strip() for line in lines if " hook " in line]
    assert hooks == ["type filter hook input priority -110; policy accept;",
                     "type filter hook forward priority -110; policy accept;",
                     "type filter hook output priority -110; policy accept;",
                     "type filter hook output priority -90; policy accept;",
                     "type nat hook prerouting priority -100; policy accept;",
                     "type nat hook output priority -100; policy accept;",
                     "type nat hook postrouting priority 100; policy accept;"]
    reject = lines.index("\tchain reject-chain {")
    assert lines[reject + 1:reject + 3] == ["\t\tmeta l4proto tcp reject with tcp reset",
                                            "\t\treject with icmp type port-unreachable"]
    assert "\t\tip daddr @cluster-ips goto reject-chain" in lines
    assert "\t\tct status dnat ip saddr . ip daddr @hairpin masquerade" in lines
    # node ports: any local address but localhost, checked before NAT and served in prerouting and output
    assert chain(text, "service-endpoints-check")[1] == \
        "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
    assert chain(text, "nat-postrouting")[1] == \
        "meta mark & 0x4000 != 0 meta mark set meta mark xor 0x4000 masquerade fully-random"


@pytest.mark.root
@needs_root
def test_nft_accepts_the_rendered_tables() -> None:
    ns = f"lsvc-nft-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        for _case, objs, node, _expected in CASES:
            kubeproxy.install(ns, render(*objs, node=node))
            listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "ip", "kube-proxy"],
                                    check=True, capture_output=True, text=True, timeout=10).stdout
            text = render(*objs, node=node)
            assert listed.count("comment \"") == len(dnat_rules(text)) + len(chain(text, "nodeports"))
        with pytest.raises(LabError, match="nft refused the kube-proxy table of lsvc-nft-"):
            kubeproxy.install(ns, "table ip kube-proxy { chain x { nonsense } }\n")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True, timeout=10)


# -- dual stack: one table per family --------------------------------------------------------------------------------
def dual_pod(name: str, ip: str, ip6: str, node: str = NODE, *, app: str) -> dict[str, Any]:
    obj = o.pod(name, ip, node, app=app)
    obj["status"]["podIPs"].append({"ip": ip6})
    return obj


def render_dual(*objs: dict[str, Any], node: str = NODE) -> dict[str, str]:
    """Both tables of a dual-stack lab's node, each as its own text."""
    mesh, errors = services.mesh_state([o.namespace("default"), *objs])
    assert errors == []
    text = kubeproxy.ruleset(mesh, node, kubeproxy.families(dual_stack=True))
    lines = text.splitlines(keepends=True)
    v6 = lines.index("add table ip6 kube-proxy\n") - 1  # its comment line
    return {"ip": "".join(lines[:v6]), "ip6": "".join(lines[v6:])}


DUAL = (dual_pod("a", "10.200.0.11", "fd00:200::11", app="web"),
        dual_pod("b", "10.200.1.10", "fd00:200:1::10", "node-2", app="web"),
        o.pod("v4only", "10.200.0.12", app="web"))
DUAL_WEB: dict[str, Any] = {"clusterIPs": ["10.96.0.10", "fd00:96::a"], "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack"}
V6_BOTH = "0 : fd00:200:1::10 . 8080, 1 : fd00:200::11 . 8080"  # sorted as text, as the IPv4 ones


def test_a_dual_stack_service_is_in_both_tables_with_the_endpoints_of_each_family() -> None:
    tables = render_dual(*DUAL, o.service("web", selector=WEB, type="NodePort", ports=[NP80], **DUAL_WEB),
                         o.service("old", selector=WEB, clusterIP="10.96.0.20", ipFamilies=["IPv4"]))
    assert dnat_rules(tables["ip"]) == [  # Services in key order
        'ip daddr 10.96.0.20 tcp dport 80 dnat ip to numgen random mod 3 map { 0 : 10.200.0.11 . 8080, '
        '1 : 10.200.0.12 . 8080, 2 : 10.200.1.10 . 8080 } comment "default/old:80"',
        'ip daddr 10.96.0.10 tcp dport 80 dnat ip to numgen random mod 3 map { 0 : 10.200.0.11 . 8080, '
        '1 : 10.200.0.12 . 8080, 2 : 10.200.1.10 . 8080 } comment "default/web:80"']
    v6 = tables["ip6"]
    assert dnat_rules(v6) == [f'ip6 daddr fd00:96::a tcp dport 80 dnat ip6 to numgen random mod 2 map {{ {V6_BOTH} }} '
                              'comment "default/web:80"']  # the IPv4-only Service is not here
    assert chain(v6, "nodeports") == [f"tcp dport 30080 {MASQ} dnat ip6 to numgen random mod 2 map {{ {V6_BOTH} }} "
                                      'comment "default/web:80 nodePort 30080"']
    assert elements(v6, "set cluster-ips") == ["fd00:96::a"]
    assert elements(v6, "set hairpin") == ["fd00:200:1::10 . fd00:200:1::10", "fd00:200::11 . fd00:200::11"]
    assert chain(v6, "service-endpoints-check")[1] == \
        "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports"
    assert chain(v6, "reject-chain") == ["meta l4proto tcp reject with tcp reset",
                                         "reject with icmpv6 type port-unreachable"]
    assert "ct status dnat ip6 saddr . ip6 daddr @hairpin masquerade" in chain(v6, "nat-postrouting")


def test_ipv6_policies_local_load_balancer_and_no_endpoint_as_for_ipv4() -> None:
    local = render_dual(*DUAL, o.service("web", selector=WEB, type="NodePort", ports=[NP80],
                                         externalTrafficPolicy="Local", **DUAL_WEB), node="node-2")["ip6"]
    assert chain(local, "nodeports") == [
        f"tcp dport 30080 ip6 saddr fd00:200::/32 dnat ip6 to numgen random mod 2 map {{ {V6_BOTH} }} "
        'comment "default/web:80 nodePort 30080: a pod"',
        f"tcp dport 30080 fib saddr type local {MASQ} dnat ip6 to numgen random mod 2 map {{ {V6_BOTH} }} "
        'comment "default/web:80 nodePort 30080: the node"',
        "tcp dport 30080 dnat ip6 to numgen random mod 1 map { 0 : fd00:200:1::10 . 8080 } "
        'comment "default/web:80 nodePort 30080"']
    internal = render_dual(*DUAL, o.service("web", selector=WEB, internalTrafficPolicy="Local", **DUAL_WEB),
                           node="node-3")["ip6"]
    assert dnat_rules(internal) == [] and elements(internal, "map no-endpoint-services") == [
        "fd00:96::a . tcp . 80 : drop"]
    lb = render_dual(*DUAL, o.service("web", selector=WEB, type="LoadBalancer", ports=[NP80], **DUAL_WEB))["ip6"]
    assert chain(lb, "nodeports") == [f"tcp dport 30080 {MASQ} dnat ip6 to numgen random mod 2 map {{ {V6_BOTH} }} "
                                      'comment "default/web:80 nodePort 30080"']  # a LoadBalancer's node port
    only_v4_pods = render_dual(DUAL[2], o.service("web", selector=WEB, type="NodePort", ports=[NP80], **DUAL_WEB))
    assert dnat_rules(only_v4_pods["ip"]) and dnat_rules(only_v4_pods["ip6"]) == []
    assert elements(only_v4_pods["ip6"], "map no-endpoint-services") == ["fd00:96::a . tcp . 80 : goto reject-chain"]
    assert elements(only_v4_pods["ip6"], "map no-endpoint-nodeports") == ["tcp . 30080 : goto reject-chain"]


def test_an_ipv4_only_lab_has_no_ipv6_table() -> None:
    text = render(*THREE, web())
    assert "ip6" not in text and text.count("add table") == 1


@pytest.mark.root
@needs_root
def test_nft_accepts_the_dual_stack_tables() -> None:
    ns = f"lsvc-nft6-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        for spec in ({}, {"externalTrafficPolicy": "Local"}):
            tables = render_dual(*DUAL, o.service("web", selector=WEB, type="NodePort", ports=[NP80], **spec,
                                                  **DUAL_WEB))
            kubeproxy.install(ns, tables["ip"] + tables["ip6"])
            for family, text in tables.items():
                listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", family, "kube-proxy"],
                                        check=True, capture_output=True, text=True, timeout=10).stdout
                assert listed.count("comment \"") == len(dnat_rules(text)) + len(chain(text, "nodeports")) > 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True, timeout=10)
