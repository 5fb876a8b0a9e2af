"""Invalid AuthorizationPolicy and PeerAuthentication objects are rejected with the object and the field path
named, and the valid objects given in the same update stay in force."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from agent.policy import Peer, PolicyEngine, PolicyError, Target

CLIENT = "cluster.local/ns/bar/sa/client"
PEER = Peer(CLIENT, "bar", "10.0.0.2")
TARGET = Target("foo", {"app": "web"}, "10.1.0.1", 80)


def ap(spec: Any, name: str = "bad", ns: str = "foo") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pa(spec: Any, name: str = "bad", ns: str = "foo") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def source(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"from": [{"source": fields}]}]}


def operation(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"to": [{"operation": fields}]}]}


def condition(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"when": [fields]}]}


AP, PA = "AuthorizationPolicy foo/bad", "PeerAuthentication foo/bad"
RULE0 = "spec.rules[0]"
SRC = f"{RULE0}.from[0].source"
OP = f"{RULE0}.to[0].operation"
WHEN = f"{RULE0}.when[0]"

# (id, object, expected object name, expected field path, a piece of the message)
INVALID: list[tuple[str, dict[str, Any], str, str, str]] = [
    # unknown fields, at every level
    ("unknown spec field", ap({"actions": "DENY"}), AP, "spec.actions", "unknown field"),
    ("unknown rule field", ap({"rules": [{"form": []}]}), AP, f"{RULE0}.form", "unknown field"),
    ("unknown from entry field", ap({"rules": [{"from": [{"sources": {}}]}]}), AP, f"{RULE0}.from[0].sources",
     "unknown field"),
    ("unknown source field", ap(source(principal=[CLIENT])), AP, f"{SRC}.principal", "unknown field"),
    ("unknown to entry field", ap({"rules": [{"to": [{"op": {}}]}]}), AP, f"{RULE0}.to[0].op", "unknown field"),
    ("unknown operation field", ap(operation(port=["80"])), AP, f"{OP}.port", "unknown field"),
    ("unknown when field", ap(condition(key="source.ip", value=["1.2.3.4"])), AP, f"{WHEN}.value", "unknown field"),
    ("unknown selector field", ap({"selector": {"matchExpressions": []}}), AP, "spec.selector.matchExpressions",
     "unknown field"),
    ("unknown targetRef field", ap({"targetRefs": [{"kind": "Service", "name": "a", "port": 80}]}), AP,
     "spec.targetRefs[0].port", "unknown field"),
    ("unknown PeerAuthentication field", pa({"portLevelMTLS": {}}), PA, "spec.portLevelMTLS", "unknown field"),
    ("unknown mtls field", pa({"mtls": {"modes": "STRICT"}}), PA, "spec.mtls.modes", "unknown field"),
    ("unknown port-level mtls field", pa({"selector": {"matchLabels": {"app": "web"}},
                                          "portLevelMtls": {"80": {"mod": "STRICT"}}}), PA,
     "spec.portLevelMtls.80.mod", "unknown field"),
    # addresses
    ("bad CIDR", ap({"rules": [{"from": [{"source": {"namespaces": ["x"]}},
                                         {"source": {"ipBlocks": ["10.0.0.0/8", "1.2.3.4", "10.0.0/33"]}}]}]}),
     AP, f"{RULE0}.from[1].source.ipBlocks[2]", '"10.0.0/33" is not a CIDR'),
    ("bad prefix length", ap(source(ipBlocks=["10.0.0.0/33"])), AP, f"{SRC}.ipBlocks[0]", "is not a CIDR"),
    ("bad IP", ap(source(notIpBlocks=["10.0.0.300"])), AP, f"{SRC}.notIpBlocks[0]",
     '"10.0.0.300" is not an IP address or CIDR'),
    ("bad remoteIpBlocks", ap(source(remoteIpBlocks=["nope"])), AP, f"{SRC}.remoteIpBlocks[0]", "is not an IP"),
    ("bad when source.ip", ap(condition(key="source.ip", values=["10.1.1"])), AP, f"{WHEN}.values[0]",
     "is not an IP"),
    ("bad when destination.ip", ap(condition(key="destination.ip", notValues=["fd00::/129"])), AP,
     f"{WHEN}.notValues[0]", "is not a CIDR"),
    ("bad when remote.ip", ap(condition(key="remote.ip", values=["x"])), AP, f"{WHEN}.values[0]", "is not an IP"),
    # ports
    ("port 0", ap(operation(ports=["0"])), AP, f"{OP}.ports[0]", '"0" is not a port'),
    ("port too big", ap(operation(ports=["80", "65536"])), AP, f"{OP}.ports[1]", '"65536" is not a port'),
    ("port by name", ap(operation(notPorts=["http"])), AP, f"{OP}.notPorts[0]", '"http" is not a port'),
    ("negative port", ap(operation(ports=["-1"])), AP, f"{OP}.ports[0]", "is not a port"),
    ("port with spaces", ap(operation(ports=[" 80"])), AP, f"{OP}.ports[0]", "is not a port"),
    ("port as a number", ap(operation(ports=[8080])), AP, f"{OP}.ports[0]", 'must be a string, not an integer'),
    ("bad when destination.port", ap(condition(key="destination.port", values=["80", "x"])), AP,
     f"{WHEN}.values[1]", "is not a port"),
    ("bad port-level port", pa({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"http": {}}}), PA,
     "spec.portLevelMtls.http", "is not a port"),
    ("port-level port 0", pa({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {0: {}}}), PA,
     "spec.portLevelMtls.0", "is not a port"),
    ("port-level port too big", pa({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {"70000": {}}}),
     PA, "spec.portLevelMtls.70000", "is not a port"),
    # types
    ("spec not a mapping", ap(["ALLOW"]), AP, "spec", "must be a mapping, not a list"),
    ("rules not a list", ap({"rules": {"from": []}}), AP, "spec.rules", "must be a list, not a mapping"),
    ("rule not a mapping", ap({"rules": ["allow"]}), AP, RULE0, "must be a mapping, not a string"),
    ("rule null", ap({"rules": [None]}), AP, RULE0, "must not be null"),
    ("from entry not a mapping", ap({"rules": [{"from": ["x"]}]}), AP, f"{RULE0}.from[0]", "must be a mapping"),
    ("from not a list", ap({"rules": [{"from": {"source": {}}}]}), AP, f"{RULE0}.from", "must be a list"),
    ("principals a string", ap(source(principals=CLIENT)), AP, f"{SRC}.principals", "must be a list, not a string"),
    ("principal a number", ap(source(principals=[1])), AP, f"{SRC}.principals[0]", "must be a string"),
    ("empty principal", ap(source(principals=[""])), AP, f"{SRC}.principals[0]", "must not be empty"),
    ("methods a string", ap(operation(ports=["80"], methods="GET")), AP, f"{OP}.methods", "must be a list"),
    ("when key a number", ap(condition(key=1, values=["a"])), AP, f"{WHEN}.key", "must be a string"),
    ("label value a number", ap({"selector": {"matchLabels": {"version": 1}}}), AP,
     "spec.selector.matchLabels.version", "label values must be strings"),
    ("matchLabels a list", ap({"selector": {"matchLabels": ["app=web"]}}), AP, "spec.selector.matchLabels",
     "must be a mapping"),
    ("mtls a string", pa({"mtls": "STRICT"}), PA, "spec.mtls", "must be a mapping, not a string"),
    ("metadata.name missing", {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                               "metadata": {"namespace": "foo"}, "spec": {}},
     "AuthorizationPolicy foo/?", "metadata.name", "must be a non-empty string"),
    ("apiVersion unknown", {**ap({}), "apiVersion": "security.istio.io/v2"}, AP, "apiVersion",
     "unsupported version"),
    # actions and modes
    ("unknown action", ap({"action": "REJECT"}), AP, "spec.action", 'unknown action "REJECT"'),
    ("lower-case action", ap({"action": "allow"}), AP, "spec.action", "unknown action"),
    ("action a number", ap({"action": 1}), AP, "spec.action", "unknown action"),
    ("AUDIT", ap({"action": "AUDIT", "rules": [{}]}), AP, "spec.action", "AUDIT is not supported at L4"),
    ("CUSTOM", ap({"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [{}]}), AP, "spec.action",
     "CUSTOM is not supported at L4"),
    ("provider without CUSTOM", ap({"provider": {"name": "x"}, "rules": [{}]}), AP, "spec.provider",
     "only valid with action CUSTOM"),
    ("unknown mode", pa({"mtls": {"mode": "STRICTER"}}), PA, "spec.mtls.mode", 'unknown mode "STRICTER"'),
    ("lower-case mode", pa({"mtls": {"mode": "strict"}}), PA, "spec.mtls.mode", "unknown mode"),
    ("unknown port-level mode", pa({"selector": {"matchLabels": {"app": "web"}},
                                    "portLevelMtls": {8080: {"mode": "OFF"}}}), PA,
     "spec.portLevelMtls.8080.mode", "unknown mode"),
    # structure Istio refuses
    ("DENY without rules", ap({"action": "DENY"}), AP, "spec.rules", "DENY policy without rules"),
    ("empty from", ap({"rules": [{"from": []}]}), AP, f"{RULE0}.from", "must not be empty"),
    ("empty to", ap({"rules": [{"to": []}]}), AP, f"{RULE0}.to", "must not be empty"),
    ("null source", ap({"rules": [{"from": [{"source": None}]}]}), AP, SRC, "must be set"),
    ("empty source", ap(source()), AP, SRC, "must not be empty"),
    ("source of empty lists", ap(source(principals=[], namespaces=[])), AP, SRC, "must not be empty"),
    ("empty operation", ap(operation()), AP, OP, "must not be empty"),
    ("when without values", ap(condition(key="source.ip")), AP, WHEN, "at least one of values or notValues"),
    ("when without key", ap(condition(values=["a"])), AP, f"{WHEN}.key", "must be set"),
    ("when unknown attribute", ap(condition(key="source.port", values=["80"])), AP, f"{WHEN}.key",
     'unknown attribute "source.port"'),
    ("when destination.namespace", ap(condition(key="destination.namespace", values=["foo"])), AP, f"{WHEN}.key",
     "metadata.namespace"),
    ("when destination.labels", ap(condition(key="destination.labels[app]", values=["web"])), AP, f"{WHEN}.key",
     "workload selector"),
    ("when header without a name", ap(condition(key="request.headers", values=["x"])), AP, f"{WHEN}.key",
     "name[item]"),
    ("selector and targetRefs", ap({"selector": {"matchLabels": {"app": "web"}},
                                    "targetRefs": [{"kind": "Service", "name": "web"}]}), AP, "spec",
     "only one of selector or targetRefs"),
    ("targetRef without name", ap({"targetRef": {"kind": "Service"}}), AP, "spec.targetRef.name", "must be set"),
    ("targetRef in another namespace", ap({"targetRefs": [{"kind": "Service", "name": "a", "namespace": "x"}]}),
     AP, "spec.targetRefs[0].namespace", "cross-namespace"),
    ("wildcard in a selector", ap({"selector": {"matchLabels": {"app": "web-*"}}}), AP,
     "spec.selector.matchLabels.app", "wildcards"),
    ("serviceAccounts with principals", ap(source(serviceAccounts=["bar/client"], principals=[CLIENT])), AP, SRC,
     "serviceAccounts cannot be set with namespaces or principals"),
    ("serviceAccounts with notNamespaces", ap(source(notServiceAccounts=["bar/client"], notNamespaces=["x"])), AP,
     SRC, "cannot be set with"),
    ("serviceAccount with two slashes", ap(source(serviceAccounts=["a/b/c"])), AP, f"{SRC}.serviceAccounts[0]",
     "is not a service account"),
    ("serviceAccount wildcard", ap(source(notServiceAccounts=["bar/*"])), AP, f"{SRC}.notServiceAccounts[0]",
     "is not a service account"),
    ("serviceAccount without a name", ap(source(serviceAccounts=["bar/"])), AP, f"{SRC}.serviceAccounts[0]",
     "is not a service account"),
    ("portLevelMtls without a selector", pa({"mtls": {"mode": "STRICT"}, "portLevelMtls": {80: {"mode": "STRICT"}}}),
     PA, "spec.portLevelMtls", "only allowed with a selector"),
    ("portLevelMtls empty", pa({"selector": {"matchLabels": {"app": "web"}}, "portLevelMtls": {}}), PA,
     "spec.portLevelMtls", "at least one port"),
]

# a valid policy given with every invalid one: it must be in force afterwards
GOOD = ap({"action": "DENY", "rules": [{"from": [{"source": {"principals": [CLIENT]}}]}]}, name="good")


@pytest.mark.parametrize(("obj", "name", "field", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_rejected_with_object_and_field(obj: dict[str, Any], name: str, field: str, message: str) -> None:
    engine = PolicyEngine()
    errors = engine.update([obj, copy.deepcopy(GOOD)])
    assert errors, "not rejected"
    found = [e for e in errors if e.field == field]
    assert found, f"no error at {field}: {[str(e) for e in errors]}"
    assert any(message in e.message for e in found), [str(e) for e in found]
    assert all(e.object == name for e in errors)
    assert str(found[0]).startswith(f"{name}: {field}: ")
    # the rejected object is not in force, the valid one is
    assert engine.policies == ["AuthorizationPolicy foo/good"]
    decision = engine.evaluate(PEER, TARGET)
    assert not decision.allowed and decision.policy == "AuthorizationPolicy foo/good"


def test_invalid_ids_are_unique() -> None:
    assert len({c[0] for c in INVALID}) == len(INVALID)


def test_error_text() -> None:
    engine = PolicyEngine()
    sources = [{"source": {"namespaces": ["x"]}}, {"source": {"ipBlocks": ["10.0.0.0/8", "1.2.3.4", "10.0.0/33"]}}]
    [error] = engine.update([ap({"rules": [{"from": sources}]})])
    assert error == PolicyError("AuthorizationPolicy foo/bad", "spec.rules[0].from[1].source.ipBlocks[2]",
                                '"10.0.0/33" is not a CIDR')
    assert str(error) == ('AuthorizationPolicy foo/bad: spec.rules[0].from[1].source.ipBlocks[2]: '
                          '"10.0.0/33" is not a CIDR')
    assert str(PolicyError("PeerAuthentication a/b", "", "duplicate")) == "PeerAuthentication a/b: duplicate"


def test_every_error_of_an_object_is_reported() -> None:
    engine = PolicyEngine()
    errors = engine.update([ap({"action": "DENY", "rules": [
        {"from": [{"source": {"ipBlocks": ["bad"], "principals": [""]}}], "to": [{"operation": {"ports": ["0"]}}]},
        {"when": [{"key": "nope", "values": ["x"]}]},
    ], "selector": {"matchLabels": {"app": 1}}})])
    assert {e.field for e in errors} == {
        "spec.rules[0].from[0].source.ipBlocks[0]", "spec.rules[0].from[0].source.principals[0]",
        "spec.rules[0].to[0].operation.ports[0]", "spec.rules[1].when[0].key", "spec.selector.matchLabels.app"}
    assert engine.policies == []


def test_a_rejected_deny_policy_denies_nothing() -> None:
    engine = PolicyEngine()
    errors = engine.update([ap({"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["eighty"]}}]}]})])
    assert len(errors) == 1
    assert engine.evaluate(PEER, TARGET).allowed


def test_rejections_across_kinds_and_valid_neighbours() -> None:
    engine = PolicyEngine()
    errors = engine.update([
        ap({"action": "AUDIT", "rules": [{}]}, name="audit"),
        pa({"mtls": {"mode": "STRICT"}}, name="mesh", ns="istio-system"),
        pa({"mtls": {"mode": "NOPE"}}, name="broken"),
        ap({"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]}, name="allow-bar"),
    ])
    assert sorted(e.object for e in errors) == ["AuthorizationPolicy foo/audit", "PeerAuthentication foo/broken"]
    assert engine.policies == ["AuthorizationPolicy foo/allow-bar", "PeerAuthentication istio-system/mesh"]
    assert engine.evaluate(PEER, TARGET).policy == "AuthorizationPolicy foo/allow-bar"
    assert engine.evaluate(Peer(None, None, "10.0.0.2"), TARGET).policy == "PeerAuthentication istio-system/mesh"


def test_null_fields_are_unset() -> None:
    engine = PolicyEngine()
    assert engine.update([ap({"action": None, "selector": None, "rules": [{"from": None, "to": None, "when": None}]},
                             name="all"),
                          pa({"mtls": None, "selector": None}, name="p"), ap(None, name="empty")]) == []
    assert engine.evaluate(PEER, TARGET).policy == "AuthorizationPolicy foo/all"
