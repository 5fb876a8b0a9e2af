"""``ambit policy explain`` and ``ambit status`` rendering, without a lab."""

from __future__ import annotations

from typing import Any

import pytest

from agent.cli.status import explain, policy_main, render_status
from agent.mesh.store import build_state


def _pod(ns: str, name: str, ip: str, node: str, labels: dict[str, str] | None = None, ip6: str = "") -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": name},
            "status": {"podIP": ip, "podIPs": [{"ip": a} for a in (ip, ip6) if a], "phase": "Running"}}


def _state(*extra: dict[str, Any]) -> Any:
    ambient = {"istio.io/dataplane-mode": "ambient"}
    return build_state([
        {"kind": "Namespace", "metadata": {"name": "shop", "labels": ambient}},
        {"kind": "Namespace", "metadata": {"name": "legacy"}},
        _pod("shop", "web", "10.0.0.1", "node-1"), _pod("shop", "db", "10.0.1.1", "node-2"),
        _pod("legacy", "batch", "10.0.2.1", "node-2"), *extra])


DENY_WEB = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-web", "namespace": "shop"},
            "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "db"}},
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}}
STRICT = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
          "metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}


def test_explain_names_the_deny_policy_and_rule() -> None:
    text = explain(_state(DENY_WEB), "shop/web", "db", 5432)
    assert "arrives over HBONE as cluster.local/ns/shop/sa/web" in text
    assert text.endswith("decision: DENY: denied by AuthorizationPolicy shop/no-web rule 0")


def test_explain_plaintext_source_under_strict() -> None:
    text = explain(_state(STRICT), "batch", "shop/db", 5432)
    assert "not in the mesh, arrives as plaintext" in text
    assert "decision: DENY: denied by PeerAuthentication shop/strict" in text


def test_explain_destination_outside_the_mesh_passes_through() -> None:
    assert "no agent decides, the connection passes through" in explain(_state(DENY_WEB), "web", "10.0.2.1", 80)


def test_explain_allows_without_policy_and_reports_rejected_ones() -> None:
    bad = {"kind": "AuthorizationPolicy", "metadata": {"name": "bad", "namespace": "shop"}, "spec": {"action": "AUDIT"}}
    text = explain(_state(bad), "web", "db", 5432)
    assert "note: rejected and not in force: AuthorizationPolicy shop/bad: spec.action" in text
    assert text.endswith("decision: ALLOW: allowed: no policy applies")


def test_explain_refuses_unknown_and_ambiguous_pods() -> None:
    with pytest.raises(ValueError, match="no pod 'nope'"):
        explain(_state(), "nope", "db", 1)
    twin = _pod("legacy", "web", "10.0.2.9", "node-2")
    with pytest.raises(ValueError, match="several namespaces"):
        explain(_state(twin), "web", "db", 1)


def test_explain_a_dual_stack_connection_over_ipv6() -> None:
    """Pods named on both sides: the source's address of the destination's family is the one policy sees."""
    only_v6 = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "v6-only", "namespace": "shop"},
               "spec": {"selector": {"matchLabels": {"app": "db6"}},
                        "rules": [{"from": [{"source": {"ipBlocks": ["fd00:200::/32"]}}]}]}}
    state = _state(_pod("shop", "web6", "10.0.0.6", "node-1", ip6="fd00:200::6"),
                   _pod("shop", "db6", "10.0.1.6", "node-2", ip6="fd00:200:1::6"), only_v6)
    text = explain(state, "web6", "fd00:200:1:0::6", 5432)  # any spelling of the address
    assert "from shop/web6 (fd00:200::6)" in text and "to shop/db6 (fd00:200:1::6):5432" in text
    assert text.endswith("decision: ALLOW: allowed by AuthorizationPolicy shop/v6-only rule 0")
    text = explain(state, "web6", "10.0.1.6", 5432)  # over IPv4, the same pods: the IPv6 block does not match
    assert "from shop/web6 (10.0.0.6)" in text
    assert text.endswith("decision: DENY: no ALLOW policy matched (shop/v6-only)")
    outside = explain(state, "web6", "2001:db8::7", 443)
    assert "to [2001:db8::7]:443: not in the mesh" in outside


@pytest.mark.parametrize(("destination", "message"), [
    ("fd00::1:80", "an IPv6 address must be written in brackets, [fd00::1]:80"),
    ("db", "is not HOST:PORT"),
])
def test_policy_explain_refuses_a_destination_that_is_not_host_port(destination: str, message: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert policy_main(["explain", "web", destination, "--state", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert message in err and "DST must be POD:PORT, IP:PORT or [IPV6]:PORT" in err


def test_render_status() -> None:
    dump = {"node": "node-1", "ready": "ready", "version": "0.1.0", "connections": 3,
            "attachments": [{"backend": "clsact"}, {"backend": "clsact"}],
            "workloads": [{"namespace": "shop", "name": "web", "ip": "10.0.0.1", "node": "node-1", "enrolled": True},
                          {"namespace": "shop", "name": "api", "ip": "10.0.0.2", "node": "node-1", "enrolled": True,
                           "probe_ports": [8080, 15021]},
                          {"namespace": "shop", "name": "db", "ip": "10.0.1.1", "node": "node-2", "enrolled": True}],
            "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "state": "available",
                              "not_after": None}],
            "policies": ["AuthorizationPolicy shop/no-web"]}
    assert render_status(dump) == (
        "node-1: ready; agent 0.1.0; 2 eBPF attachments (clsact); 3 proxied connections\n"
        "  enrolled pods: shop/web (10.0.0.1), shop/api (10.0.0.2; probe ports 8080,15021)\n"
        "  certificate:   spiffe://cluster.local/ns/shop/sa/web: available\n"
        "  policies:      AuthorizationPolicy shop/no-web")
    assert render_status({"where": "/x.sock", "error": "agent unreachable: boom"}) == "/x.sock: agent unreachable: boom"


def test_render_status_lists_the_agents_services() -> None:
    dump = {"node": "node-2", "ready": "ready", "version": "0.1.0", "connections": 0, "attachments": [],
            "workloads": [], "certificates": [], "policies": [],
            "services": [
                {"namespace": "shop", "name": "web", "hostname": "web.shop.svc.cluster.local", "vips": ["10.96.0.9"],
                 "ports": [{"port": 80, "target_port": 8080, "target_name": ""},
                           {"port": 443, "target_port": 0, "target_name": "https"}],
                 "endpoints": [{"ip": "10.200.1.10", "node": "node-2", "ports": {"80": 8080, "443": 8443}},
                               {"ip": "10.200.0.9", "node": "node-1", "ports": {"80": 8080}}]},
                {"namespace": "default", "name": "db", "hostname": "db.default.svc.cluster.local", "vips": [],
                 "ports": [{"port": 5432, "target_port": 5432, "target_name": ""}], "endpoints": []},
                {"namespace": "shop", "name": "front", "hostname": "front.shop.svc.cluster.local",
                 "vips": ["10.96.0.7"], "external_traffic_policy": "Cluster",
                 "ports": [{"port": 80, "target_port": 8080, "target_name": "", "node_port": 30080}],
                 "endpoints": [{"ip": "10.200.0.9", "node": "node-1", "ports": {"80": 8080}}]}]}
    assert render_status(dump).splitlines()[-3:] == [
        "  service:       default/db headless 5432->5432/TCP -> <none>",
        "  service:       shop/front 10.96.0.7 80:30080->8080/TCP -> 10.200.0.9:8080",
        "  service:       shop/web 10.96.0.9 80->8080/TCP,443->https/TCP -> 10.200.0.9:8080, 10.200.1.10:8080,8443"]
    assert render_status({**dump, "services": []}).splitlines()[-1] == "  services:      none"
