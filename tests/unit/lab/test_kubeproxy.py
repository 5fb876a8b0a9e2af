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
    assert last == "fib daddr type local ip daddr != 127.0.0.0/8 jump nodeports"
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
