"""The policy parser: every field of AuthorizationPolicy and PeerAuthentication read into typed values, kept
whole (HTTP fields, targetRefs, AUDIT and CUSTOM included), and Istio's webhook rules on what it accepts."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from agent.policy.model import PolicyError
from agent.policy.objects import (
    AuthorizationPolicy,
    Condition,
    Meta,
    Operation,
    PeerAuthentication,
    Rule,
    ServiceAccount,
    Source,
    TargetRef,
    port_number,
    read,
    read_all,
)


def ap(spec: Any, name: str = "p", ns: str | None = "foo", **meta: Any) -> dict[str, Any]:
    metadata = {"name": name, **meta}
    if ns is not None:
        metadata["namespace"] = ns
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": metadata, "spec": spec}


def pa(spec: Any, name: str = "p", ns: str = "foo", **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns, **meta}, "spec": spec}


def accepted(obj: dict[str, Any]) -> Any:
    result = read(obj)
    assert result is not None and not result.errors, [str(e) for e in result.errors] if result else None
    return result.value


def rejected(obj: dict[str, Any]) -> list[PolicyError]:
    result = read(obj)
    assert result is not None and result.errors and result.value is None
    return result.errors


def fields(errors: list[PolicyError]) -> set[str]:
    return {e.field for e in errors}


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text, strict=False)


FULL_SPEC: dict[str, Any] = {
    "action": "DENY",
    "selector": {"matchLabels": {"app": "web", "version": "v1"}},
    "rules": [
        {
            "from": [
                {"source": {"principals": ["cluster.local/ns/bar/sa/client", "*/sa/x"],
                            "notPrincipals": ["*"], "requestPrincipals": ["iss/sub"],
                            "notRequestPrincipals": ["iss/other"], "namespaces": ["bar", "ba*"],
                            "notNamespaces": ["*z"], "ipBlocks": ["10.0.0.0/8", "10.1.2.3"],
                            "notIpBlocks": ["10.9.0.0/16"], "remoteIpBlocks": ["192.168.0.0/16"],
                            "notRemoteIpBlocks": ["192.168.1.1"]}},
                {"source": {"serviceAccounts": ["bar/client", "web"], "notServiceAccounts": ["baz/x"]}},
            ],
            "to": [{"operation": {"hosts": ["a.example"], "notHosts": ["b.example"], "ports": ["80", "0443"],
                                  "notPorts": ["8080"], "methods": ["GET"], "notMethods": ["DELETE"],
                                  "paths": ["/api/{*}/items/{**}"], "notPaths": ["/admin*"]}}],
            "when": [{"key": "request.headers[User-Agent]", "values": ["curl/*"]},
                     {"key": "destination.port", "notValues": ["9090"]},
                     {"key": "request.auth.claims[iss]", "values": ["https://issuer"], "notValues": ["x"]},
                     {"key": "source.serviceAccount", "values": ["bar/client"]},
                     {"key": "experimental.envoy.filters.network.mysql_proxy[db.table]", "values": ["[update]"]}],
        },
        {},
    ],
}


def test_every_field_is_read_into_typed_values() -> None:
    policy = accepted(ap(FULL_SPEC, creationTimestamp="2024-02-01T10:00:00Z"))
    assert policy == AuthorizationPolicy(
        meta=Meta("AuthorizationPolicy", "foo", "p", 1706781600.0),
        action="DENY",
        selector=frozenset({("app", "web"), ("version", "v1")}),
        rules=(
            Rule(
                sources=(
                    Source(principals=("cluster.local/ns/bar/sa/client", "*/sa/x"), not_principals=("*",),
                           request_principals=("iss/sub",), not_request_principals=("iss/other",),
                           namespaces=("bar", "ba*"), not_namespaces=("*z",),
                           ip_blocks=(net("10.0.0.0/8"), net("10.1.2.3/32")), not_ip_blocks=(net("10.9.0.0/16"),),
                           remote_ip_blocks=(net("192.168.0.0/16"),), not_remote_ip_blocks=(net("192.168.1.1/32"),)),
                    Source(service_accounts=(ServiceAccount("bar", "client"), ServiceAccount("foo", "web")),
                           not_service_accounts=(ServiceAccount("baz", "x"),)),
                ),
                operations=(Operation(hosts=("a.example",), not_hosts=("b.example",), ports=(80, 443),
                                      not_ports=(8080,), methods=("GET",), not_methods=("DELETE",),
                                      paths=("/api/{*}/items/{**}",), not_paths=("/admin*",)),),
                conditions=(
                    Condition("request.headers[User-Agent]", "request.headers", "User-Agent", ("curl/*",)),
                    Condition("destination.port", "destination.port", None, (), ("9090",)),
                    Condition("request.auth.claims[iss]", "request.auth.claims", "iss", ("https://issuer",), ("x",)),
                    Condition("source.serviceAccount", "source.serviceAccount", None, ("bar/client",)),
                    Condition("experimental.envoy.filters.network.mysql_proxy[db.table]",
                              "experimental.envoy.filters.network.mysql_proxy", "db.table", ("[update]",)),
                ),
            ),
            Rule(),
        ),
    )
    assert policy.ref == "AuthorizationPolicy foo/p" and policy.namespace == "foo" and policy.name == "p"


def test_target_refs_are_kept_whole() -> None:
    policy = accepted(ap({"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"},
                          "targetRefs": [{"kind": "Service", "name": "web"},
                                         {"kind": "ServiceEntry", "group": "networking.istio.io", "name": "ext"},
                                         {"kind": "Service", "group": "core", "name": "api"}],
                          "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}))
    assert policy.target_refs == (TargetRef("gateway.networking.k8s.io", "Gateway", "gw"),
                                  TargetRef("", "Service", "web"),
                                  TargetRef("networking.istio.io", "ServiceEntry", "ext"),
                                  TargetRef("core", "Service", "api"))
    assert policy.selector is None and policy.rules[0].operations[0].methods == ("GET",)


@pytest.mark.parametrize(("ref", "field"), [
    ({"kind": "Pod", "name": "x"}, "spec.targetRefs[0].kind"),
    ({"kind": "Service", "group": "networking.istio.io", "name": "x"}, "spec.targetRefs[0].kind"),
    ({"kind": "Gateway", "name": "x"}, "spec.targetRefs[0].kind"),  # Gateway is not a core kind
    ({"kind": "Service"}, "spec.targetRefs[0].name"),
    ({"kind": "Service", "name": 5}, "spec.targetRefs[0].name"),
])
def test_target_refs_follow_istio_webhook(ref: dict[str, Any], field: str) -> None:
    assert field in fields(rejected(ap({"targetRefs": [ref]})))


def test_audit_and_custom_are_valid_policies() -> None:
    audit = accepted(ap({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/audit"]}}]}]}))
    assert audit.action == "AUDIT" and audit.provider is None
    custom = accepted(ap({"action": "CUSTOM", "provider": {"name": "ext-authz"},
                          "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}))
    assert custom.action == "CUSTOM" and custom.provider == "ext-authz"


@pytest.mark.parametrize(("spec", "field", "message"), [
    ({"action": "CUSTOM", "provider": {"name": "x"}}, "spec.rules", "CUSTOM policy without rules"),
    ({"action": "CUSTOM", "rules": [{}]}, "spec.provider.name", "must be set"),
    ({"action": "CUSTOM", "provider": {}, "rules": [{}]}, "spec.provider.name", "must be set"),
    ({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"from": [{"source": {"principals": ["a"]}}]}]},
     "spec.rules[0].from[0].source.principals", "not supported with action CUSTOM"),
    ({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"when": [{"key": "request.auth.claims[iss]",
                                                                           "values": ["a"]}]}]},
     "spec.rules[0].when[0].key", "not supported with action CUSTOM"),
    ({"action": "ALLOW", "provider": {"name": "x"}}, "spec.provider", "only valid with action CUSTOM"),
    ({"provider": {"name": "x", "port": 1}, "action": "CUSTOM", "rules": [{}]}, "spec.provider.port", "unknown field"),
])
def test_custom_follows_istio_webhook(spec: dict[str, Any], field: str, message: str) -> None:
    errors = [e for e in rejected(ap(spec)) if e.field == field]
    assert errors and message in errors[0].message


@pytest.mark.parametrize(("path", "ok"), [
    ("/api/{*}/items", True), ("/api/{**}", True), ("/{*}/{*}/{**}", True), ("/a*", True), ("*.html", True),
    ("/api/{**}/{*}", False), ("/api/{x}", False), ("/api/}", False), ("/{*}/a b", False),
])
def test_path_templates(path: str, ok: bool) -> None:
    obj = ap({"rules": [{"to": [{"operation": {"paths": [path]}}]}]})
    if ok:
        assert accepted(obj).rules[0].operations[0].paths == (path,)
    else:
        assert fields(rejected(obj)) == {"spec.rules[0].to[0].operation.paths[0]"}


def test_service_account_limits() -> None:
    many = [f"ns/sa{i}" for i in range(17)]
    assert "spec.rules[0].from[0].source.serviceAccounts" in fields(
        rejected(ap({"rules": [{"from": [{"source": {"serviceAccounts": many}}]}]})))
    long = "ns/" + "a" * 318
    assert fields(rejected(ap({"rules": [{"from": [{"source": {"notServiceAccounts": [long]}}]}]}))) == {
        "spec.rules[0].from[0].source.notServiceAccounts[0]"}
    assert accepted(ap({"rules": [{"from": [{"source": {"serviceAccounts": many[:16]}}]}]}))


def test_when_keys_istio_knows() -> None:
    for key in ("source.ip", "remote.ip", "source.namespace", "source.principal", "request.auth.principal",
                "request.auth.audiences", "request.auth.presenter", "connection.sni", "destination.ip",
                "request.experimental.inline.headers[x-a]"):
        values = ["10.0.0.1"] if key.endswith(".ip") else ["a"]
        assert accepted(ap({"rules": [{"when": [{"key": key, "values": values}]}]}))
    assert fields(rejected(ap({"rules": [{"when": [{"key": "source.serviceAccount", "values": ["a/b/c"]}]}]}))) == {
        "spec.rules[0].when[0].values[0]"}


def test_error_indexes_are_positions_in_the_list() -> None:
    errors = rejected(ap({"rules": [{"from": [{"source": {"ipBlocks": [1, "10.0.0.0/8", "nope"]}}]}]}))
    assert fields(errors) == {"spec.rules[0].from[0].source.ipBlocks[0]", "spec.rules[0].from[0].source.ipBlocks[2]"}


def test_peer_authentication() -> None:
    value = accepted(pa({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
                         "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, 9090: {"mode": "DISABLE"}, 443: {}}},
                        creationTimestamp="2024-02-01T10:00:00Z"))
    assert value == PeerAuthentication(Meta("PeerAuthentication", "foo", "p", 1706781600.0),
                                       frozenset({("app", "web")}), "STRICT",
                                       {8080: "PERMISSIVE", 9090: "DISABLE", 443: "UNSET"})
    assert value.age == (1706781600.0, "p")


@pytest.mark.parametrize("namespace", ["", False, 0, [], {}, 12])
def test_a_namespace_given_must_be_a_non_empty_string(namespace: Any) -> None:
    errors = rejected(ap({}, ns=namespace))
    assert [(e.object, e.field) for e in errors] == [("AuthorizationPolicy ?/p", "metadata.namespace")]
    assert "must be a non-empty string" in errors[0].message


def test_a_namespace_left_out_is_default() -> None:
    assert accepted(ap({}, ns=None)).namespace == "default"
    assert accepted({"kind": "PeerAuthentication", "metadata": {"name": "x", "namespace": None}}).namespace == "default"


def test_metadata_must_be_a_mapping() -> None:
    errors = rejected({"kind": "AuthorizationPolicy", "metadata": ["x"], "spec": {}})
    assert {(e.object, e.field) for e in errors} == {("AuthorizationPolicy default/?", "metadata"),
                                                     ("AuthorizationPolicy default/?", "metadata.name")}


def test_unreadable_creation_timestamps_are_the_oldest() -> None:
    for stamp in ("yesterday", "2024-13-01T00:00:00Z", 12, None, [1]):
        assert accepted(pa({}, creationTimestamp=stamp)).meta.created == 0.0
    assert accepted(pa({}, creationTimestamp="0001-01-01T00:00:00+14:00")).meta.created == -62135647200.0


def test_port_numbers() -> None:
    assert [port_number(v) for v in ("80", "0080", "65535", "65536", "0", "-1", " 80", "8 0", "٨٠", "9" * 5000,
                                     "0" * 5000 + "443", 80, True, 0)] == [
        80, 80, 65535, None, None, None, None, None, None, None, 443, 80, None, None]


def test_read_all_keeps_the_first_of_each_name_and_ignores_other_things() -> None:
    first, second = ap({"action": "DENY", "rules": [{}]}), ap({})
    found = read_all([first, "text", None, {"kind": "Pod", "metadata": {"name": "p"}}, second,
                      pa({}, name="x"), ap({"rules": "no"}, name="bad")])
    assert [v.ref for v in found.values] == ["AuthorizationPolicy foo/p", "PeerAuthentication foo/x"]
    assert isinstance(found.values[0], AuthorizationPolicy) and found.values[0].action == "DENY"
    assert [str(e) for e in found.errors] == [
        "AuthorizationPolicy foo/p: given more than once; the first one is in force",
        "AuthorizationPolicy foo/bad: spec.rules: must be a list, not a string"]


def test_notes_are_kept_with_the_value() -> None:
    value = accepted(ap({"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"],
                                                         "namespaces": ["a*b"]}}]}]}))
    assert [level for level, _ in value.notes] == [logging.WARNING, logging.WARNING]
    assert "without spiffe://" in value.notes[0][1] and "matched literally" in value.notes[1][1]


def test_ipv6_blocks_are_read_and_ipv4_mapped_ones_noted() -> None:
    value = accepted(ap({"rules": [{"from": [{"source": {"ipBlocks": ["fd00:200::/32", "::ffff:10.0.0.0/104"],
                                                         "notIpBlocks": ["fd00:200:1::11"],
                                                         "remoteIpBlocks": ["2001:db8::/32"]}}],
                                    "when": [{"key": "destination.ip", "values": ["fd00:200:2::/48"]}]}]}))
    assert isinstance(value, AuthorizationPolicy)
    source = value.rules[0].sources[0]
    assert source.ip_blocks == (net("fd00:200::/32"), net("::ffff:10.0.0.0/104"))
    assert source.not_ip_blocks == (net("fd00:200:1::11/128"),)
    assert source.remote_ip_blocks == (net("2001:db8::/32"),)
    [(level, note)] = value.notes
    assert level == logging.WARNING
    assert '.ipBlocks[1] "::ffff:10.0.0.0/104" is IPv4-mapped' in note and "write 10.0.0.0/8" in note
