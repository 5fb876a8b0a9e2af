"""The L4 projection: what ztunnel enforces of parsed policies, as istiod's ambient translation hands them to it
(targetRefs to waypoints, AUDIT and CUSTOM refused, HTTP attributes never matching in ALLOW rules and dropped
from DENY rules), as conditions the compiler turns into code."""

from __future__ import annotations

import logging
from typing import Any

from agent.policy import PolicyEngine
from agent.policy.l4 import L4Rule, project
from agent.policy.matchers import Check, IpSet, StringSet, parse_block
from agent.policy.model import Decision
from agent.policy.objects import AuthorizationPolicy, read_all


def ap(name: str = "p", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "foo"}, "spec": spec}


def values(*objects: dict[str, Any]) -> list[Any]:
    parsed = read_all(objects)
    assert parsed.errors == []
    return parsed.values


REF = "AuthorizationPolicy foo/p"


def blocks(*texts: str) -> IpSet:
    return IpSet.of(parse_block(t) for t in texts)


def test_every_l4_field_becomes_a_check() -> None:
    [policy] = project(values(ap(action="DENY", rules=[{
        "from": [{"source": {"principals": ["a/ns/b/sa/c"], "notPrincipals": ["x*"], "namespaces": ["b"],
                             "notNamespaces": ["*z"], "ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.1.0.0/16"]}},
                 {"source": {"serviceAccounts": ["b/c", "d"], "notServiceAccounts": ["e/f"]}}],
        "to": [{"operation": {"ports": ["80", "443"], "notPorts": ["8080"]}}],
        "when": [{"key": "source.ip", "values": ["10.0.0.1"], "notValues": ["10.0.0.2"]},
                 {"key": "destination.ip", "values": ["10.2.0.0/16"]},
                 {"key": "destination.port", "notValues": ["0009090"]},
                 {"key": "source.namespace", "values": ["b*"]},
                 {"key": "source.principal", "notValues": ["*"]}]}]))).policies
    [rule] = policy.rules
    assert rule == L4Rule(0, (
        ((Check("principal", StringSet.of(["a/ns/b/sa/c"])), Check("principal", StringSet.of(["x*"]), True),
          Check("namespace", StringSet.of(["b"])), Check("namespace", StringSet.of(["*z"]), True),
          Check("source_ip", blocks("10.0.0.0/8")), Check("source_ip", blocks("10.1.0.0/16"), True)),
         (Check("service_account", frozenset({"/ns/b/sa/c", "/ns/foo/sa/d"})),
          Check("service_account", frozenset({"/ns/e/sa/f"}), True))),
        ((Check("port", frozenset({80, 443})), Check("port", frozenset({8080}), True)),),
        ((Check("source_ip", blocks("10.0.0.1")), Check("source_ip", blocks("10.0.0.2"), True)),),
        ((Check("destination_ip", blocks("10.2.0.0/16")),),),
        ((Check("port", frozenset({9090}), True),),),
        ((Check("namespace", StringSet.of(["b*"])),),),
        ((Check("principal", StringSet.of(["*"]), True),),),
    ), Decision(False, REF, 0, f"denied by {REF} rule 0"))


def test_allow_rules_with_http_attributes_never_match() -> None:
    out = project(values(ap(rules=[{"to": [{"operation": {"methods": ["GET"]}}]},
                                   {"from": [{"source": {"namespaces": ["b"]}}]},
                                   {"when": [{"key": "request.headers[x]", "values": ["1"]}]}])))
    [policy] = out.policies
    assert [r.index for r in policy.rules] == [1]
    [(level, note)] = out.notes
    assert level == logging.WARNING
    assert "(methods, request.headers[x]) in rule(s) 0, 2: ALLOW rules using them never match" in note


def test_deny_rules_are_enforced_without_http_attributes() -> None:
    out = project(values(ap(action="DENY", rules=[
        {"from": [{"source": {"requestPrincipals": ["*"]}}, {"source": {"namespaces": ["b"]}}]},
        {"to": [{"operation": {"ports": ["80"], "paths": ["/admin"]}}],
         "when": [{"key": "connection.sni", "values": ["a"]}, {"key": "source.serviceAccount", "values": ["b/c"]}]},
    ])))
    first, second = out.policies[0].rules
    assert first.condition == ()  # a source left with no L4 field matches everything, so the clause goes
    assert second.condition == (((Check("port", frozenset({80})),),),)
    assert "DENY rules are enforced without them" in out.notes[0][1]
    assert "(connection.sni, paths, requestPrincipals, source.serviceAccount)" in out.notes[0][1]


def test_target_refs_go_to_the_waypoint_whatever_the_action() -> None:
    objects = [ap(name=f"wp-{action.lower()}", action=action, provider={"name": "x"} if action == "CUSTOM" else None,
                  targetRefs=[{"kind": "Service", "name": "web"}],
                  rules=[{"to": [{"operation": {"methods": ["GET"]}}]}])
               for action in ("ALLOW", "DENY", "AUDIT", "CUSTOM")]
    out = project(values(*objects))
    assert out.policies == [] and out.errors == []
    assert [p.action for p in out.waypoint] == ["ALLOW", "DENY", "AUDIT", "CUSTOM"]
    assert all(isinstance(p, AuthorizationPolicy) and p.rules[0].operations[0].methods == ("GET",)
               for p in out.waypoint)
    assert all("for waypoints and is not enforced at L4" in note for _, note in out.notes)


def test_audit_and_custom_are_refused_at_l4() -> None:
    out = project(values(ap(name="a", action="AUDIT"), ap(name="c", action="CUSTOM", provider={"name": "x"},
                                                            rules=[{}])))
    assert [(e.object, e.field) for e in out.errors] == [("AuthorizationPolicy foo/a", "spec.action"),
                                                         ("AuthorizationPolicy foo/c", "spec.action")]
    assert "ztunnel rejects AUDIT" in out.errors[0].message and out.policies == []


def test_peer_authentication_disable_is_noted() -> None:
    out = project(values({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                          "metadata": {"name": "x", "namespace": "foo"},
                          "spec": {"selector": {"matchLabels": {"a": "b"}},
                                   "portLevelMtls": {80: {"mode": "DISABLE"}}}}))
    assert [a.ref for a in out.authentications] == ["PeerAuthentication foo/x"]
    assert out.notes == [(logging.INFO, "PeerAuthentication foo/x: mode DISABLE is treated as PERMISSIVE in ambient "
                                        "mode")]


def test_the_engine_keeps_waypoint_policies_whole() -> None:
    engine = PolicyEngine()
    assert engine.update([ap(name="wp", targetRefs=[{"kind": "Service", "name": "web"}],
                             rules=[{"to": [{"operation": {"paths": ["/x"]}}]}]), ap(name="l4")]) == []
    assert engine.policies == ["AuthorizationPolicy foo/l4"]
    [waypoint] = engine.waypoint_policies
    assert waypoint.ref == "AuthorizationPolicy foo/wp" and waypoint.rules[0].operations[0].paths == ("/x",)
