"""L4 authorization semantics, table-driven from Istio's documented behaviour (AuthorizationPolicy and
PeerAuthentication as ztunnel enforces them): every source, operation and condition field and its ``not``
form, every string form, scopes, DENY before ALLOW, ``{}`` policies and rules, HTTP-only attributes,
targetRefs, and PeerAuthentication levels and port exceptions, each row checking the decision and what
reached it."""

from __future__ import annotations

import copy
import datetime
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from agent.policy import Decision, Peer, PolicyEngine, Target
from agent.policy.compiler import RuleGroup, compile_rules, specialize
from agent.policy.matchers import Attribute, Check, Condition, IpSet, StringSet, holds, parse_block

ROOT = "istio-system"
CLIENT = "cluster.local/ns/bar/sa/client"


def ap(name: str, ns: str = "foo", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pa(name: str, ns: str = "foo", mode: str | None = None, created: str | None = None,
       **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    if mode:
        spec["mtls"] = {"mode": mode}
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta, "spec": spec}


def allow(*rules: dict[str, Any], name: str = "a", ns: str = "foo", **spec: Any) -> dict[str, Any]:
    return ap(name, ns, rules=list(rules), **spec)


def deny(*rules: dict[str, Any], name: str = "d", ns: str = "foo", **spec: Any) -> dict[str, Any]:
    return ap(name, ns, action="DENY", rules=list(rules), **spec)


def src(**source: Any) -> dict[str, Any]:
    return {"from": [{"source": source}]}


def op(**operation: Any) -> dict[str, Any]:
    return {"to": [{"operation": operation}]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> dict[str, Any]:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return {"when": [condition]}


def mtls(ns: str = "bar", sa: str = "client", ip: str = "10.0.0.2", domain: str = "cluster.local") -> Peer:
    return Peer(f"{domain}/ns/{ns}/sa/{sa}", ns, ip)


def plain(ip: str = "10.0.0.2") -> Peer:
    return Peer(None, None, ip)


def to(ns: str = "foo", port: int = 80, ip: str = "10.1.0.1", **labels: str) -> Target:
    return Target(ns, labels or {"app": "web"}, ip, port)


# expected outcomes: (allowed, deciding policy, rule)
Outcome = tuple[bool, str | None, int | None]
DEFAULT: Outcome = (True, None, None)
NO_MATCH: Outcome = (False, None, None)


def allowed_by(ref: str, rule: int = 0) -> Outcome:
    return (True, f"AuthorizationPolicy {ref}", rule)


def denied_by(ref: str, rule: int = 0) -> Outcome:
    return (False, f"AuthorizationPolicy {ref}", rule)


def strict(ref: str) -> Outcome:
    return (False, f"PeerAuthentication {ref}", None)


@dataclass
class Case:
    name: str
    objects: list[dict[str, Any]]
    peer: Peer
    target: Target
    expected: Outcome


ALLOWED_A, DENIED_D = allowed_by("foo/a"), denied_by("foo/d")

CASES = [
    # -- no policy ------------------------------------------------------------------------------------
    Case("no policy: allowed", [], mtls(), to(), DEFAULT),
    Case("no policy: plaintext allowed", [], plain(), to(), DEFAULT),
    # -- principals: exact, prefix, suffix, presence, and notPrincipals --------------------------------
    Case("principals exact: match", [allow(src(principals=[CLIENT]))], mtls(), to(), ALLOWED_A),
    Case("principals exact: other sa", [allow(src(principals=[CLIENT]))], mtls(sa="other"), to(), NO_MATCH),
    Case("principals exact: plaintext", [allow(src(principals=[CLIENT]))], plain(), to(), NO_MATCH),
    Case("principals prefix: match", [allow(src(principals=["cluster.local/ns/bar/*"]))], mtls(), to(), ALLOWED_A),
    Case("principals prefix: other ns", [allow(src(principals=["cluster.local/ns/bar/*"]))], mtls(ns="baz"), to(),
         NO_MATCH),
    Case("principals prefix matches the prefix itself", [allow(src(principals=[CLIENT + "*"]))], mtls(), to(),
         ALLOWED_A),
    Case("principals suffix: match", [allow(src(principals=["*/sa/client"]))], mtls(ns="baz"), to(), ALLOWED_A),
    Case("principals suffix: other sa", [allow(src(principals=["*/sa/client"]))], mtls(sa="server"), to(), NO_MATCH),
    Case("principals presence: any identity", [allow(src(principals=["*"]))], mtls(ns="x", sa="y"), to(), ALLOWED_A),
    Case("principals presence: not plaintext", [allow(src(principals=["*"]))], plain(), to(), NO_MATCH),
    Case("principals: one of several", [allow(src(principals=["cluster.local/ns/x/sa/y", CLIENT]))], mtls(), to(),
         ALLOWED_A),
    Case("principals are compared without spiffe://", [allow(src(principals=["spiffe://" + CLIENT]))], mtls(), to(),
         NO_MATCH),
    Case("notPrincipals exact: listed", [allow(src(notPrincipals=[CLIENT]))], mtls(), to(), NO_MATCH),
    Case("notPrincipals exact: not listed", [allow(src(notPrincipals=[CLIENT]))], mtls(sa="other"), to(),
         ALLOWED_A),
    Case("notPrincipals prefix", [allow(src(notPrincipals=["cluster.local/ns/bar/*"]))], mtls(), to(), NO_MATCH),
    Case("notPrincipals suffix", [allow(src(notPrincipals=["*/sa/other"]))], mtls(), to(), ALLOWED_A),
    Case("notPrincipals presence: plaintext passes", [allow(src(notPrincipals=["*"]))], plain(), to(), ALLOWED_A),
    Case("notPrincipals presence: identity fails", [allow(src(notPrincipals=["*"]))], mtls(), to(), NO_MATCH),
    Case("DENY notPrincipals *: denies plaintext", [deny(src(notPrincipals=["*"]))], plain(), to(), DENIED_D),
    Case("DENY notPrincipals *: lets mTLS through", [deny(src(notPrincipals=["*"]))], mtls(), to(), DEFAULT),
    # -- namespaces ------------------------------------------------------------------------------------
    Case("namespaces exact: match", [allow(src(namespaces=["bar"]))], mtls(), to(), ALLOWED_A),
    Case("namespaces exact: other", [allow(src(namespaces=["bar"]))], mtls(ns="baz"), to(), NO_MATCH),
    Case("namespaces exact: plaintext", [allow(src(namespaces=["bar"]))], plain(), to(), NO_MATCH),
    Case("namespaces prefix", [allow(src(namespaces=["team-*"]))], mtls(ns="team-a"), to(), ALLOWED_A),
    Case("namespaces prefix: other", [allow(src(namespaces=["team-*"]))], mtls(ns="other-a"), to(), NO_MATCH),
    Case("namespaces suffix", [allow(src(namespaces=["*-prod"]))], mtls(ns="shop-prod"), to(), ALLOWED_A),
    Case("namespaces suffix: other", [allow(src(namespaces=["*-prod"]))], mtls(ns="shop-dev"), to(), NO_MATCH),
    Case("namespaces presence", [allow(src(namespaces=["*"]))], mtls(ns="anything"), to(), ALLOWED_A),
    Case("namespaces presence: plaintext", [allow(src(namespaces=["*"]))], plain(), to(), NO_MATCH),
    Case("notNamespaces: listed", [allow(src(notNamespaces=["bar"]))], mtls(), to(), NO_MATCH),
    Case("notNamespaces: not listed", [allow(src(notNamespaces=["bar"]))], mtls(ns="baz"), to(), ALLOWED_A),
    Case("notNamespaces prefix", [allow(src(notNamespaces=["ba*"]))], mtls(ns="baz"), to(), NO_MATCH),
    Case("notNamespaces: plaintext passes", [allow(src(notNamespaces=["bar"]))], plain(), to(), ALLOWED_A),
    Case("DENY notNamespaces: other namespace denied", [deny(src(notNamespaces=["foo"]))], mtls(), to(), DENIED_D),
    Case("DENY notNamespaces: own namespace passes", [deny(src(notNamespaces=["foo"]))], mtls(ns="foo"), to(),
         DEFAULT),
    # -- serviceAccounts -------------------------------------------------------------------------------
    Case("serviceAccounts ns/sa: match", [allow(src(serviceAccounts=["bar/client"]))], mtls(), to(), ALLOWED_A),
    Case("serviceAccounts ns/sa: other sa", [allow(src(serviceAccounts=["bar/client"]))], mtls(sa="x"), to(),
         NO_MATCH),
    Case("serviceAccounts ns/sa: other ns", [allow(src(serviceAccounts=["bar/client"]))], mtls(ns="baz"), to(),
         NO_MATCH),
    Case("serviceAccounts ignore the trust domain", [allow(src(serviceAccounts=["bar/client"]))],
         mtls(domain="other.example"), to(), ALLOWED_A),
    Case("serviceAccounts: plaintext", [allow(src(serviceAccounts=["bar/client"]))], plain(), to(), NO_MATCH),
    Case("serviceAccounts bare name: the policy's namespace", [allow(src(serviceAccounts=["client"]))],
         mtls(ns="foo"), to(), ALLOWED_A),
    Case("serviceAccounts bare name: not another namespace", [allow(src(serviceAccounts=["client"]))], mtls(),
         to(), NO_MATCH),
    Case("notServiceAccounts: listed", [allow(src(notServiceAccounts=["bar/client"]))], mtls(), to(), NO_MATCH),
    Case("notServiceAccounts: not listed", [allow(src(notServiceAccounts=["bar/client"]))], mtls(sa="x"), to(),
         ALLOWED_A),
    Case("notServiceAccounts: plaintext passes", [allow(src(notServiceAccounts=["bar/client"]))], plain(), to(),
         ALLOWED_A),
    # -- ipBlocks --------------------------------------------------------------------------------------
    Case("ipBlocks CIDR: inside", [allow(src(ipBlocks=["10.0.0.0/24"]))], mtls(ip="10.0.0.77"), to(), ALLOWED_A),
    Case("ipBlocks CIDR: outside", [allow(src(ipBlocks=["10.0.0.0/24"]))], mtls(ip="10.0.1.1"), to(), NO_MATCH),
    Case("ipBlocks single IP: same", [allow(src(ipBlocks=["10.0.0.2"]))], plain("10.0.0.2"), to(), ALLOWED_A),
    Case("ipBlocks single IP: other", [allow(src(ipBlocks=["10.0.0.2"]))], plain("10.0.0.3"), to(), NO_MATCH),
    Case("ipBlocks host bits ignored", [allow(src(ipBlocks=["10.0.0.9/24"]))], plain("10.0.0.200"), to(),
         ALLOWED_A),
    Case("ipBlocks IPv6", [allow(src(ipBlocks=["fd00::/64"]))], plain("fd00::1:2"), to(), ALLOWED_A),
    Case("ipBlocks IPv6: outside", [allow(src(ipBlocks=["fd00::/64"]))], plain("fd01::1"), to(), NO_MATCH),
    Case("ipBlocks IPv4 vs an IPv6 peer", [allow(src(ipBlocks=["0.0.0.0/0"]))], plain("fd00::1"), to(), NO_MATCH),
    Case("ipBlocks IPv4-mapped peer", [allow(src(ipBlocks=["10.0.0.0/8"]))], plain("::ffff:10.9.8.7"), to(),
         ALLOWED_A),
    # ztunnel keeps a block written IPv4-mapped as an IPv6 network; connections are IPv4 (to_canonical): no match
    Case("ipBlocks IPv4-mapped block: matches no IPv4 peer", [allow(src(ipBlocks=["::ffff:10.0.0.0/104"]))],
         plain("10.1.2.3"), to(), NO_MATCH),
    Case("ipBlocks IPv4-mapped block: nor an IPv4-mapped one", [allow(src(ipBlocks=["::ffff:10.0.0.0/104"]))],
         plain("::ffff:10.1.2.3"), to(), NO_MATCH),
    Case("DENY notIpBlocks IPv4-mapped: every IPv4 peer is outside it", [deny(src(notIpBlocks=["::ffff:0:0/96"]))],
         plain("10.1.2.3"), to(), DENIED_D),
    Case("ipBlocks IPv6 host", [allow(src(ipBlocks=["fd00:200:1::11"]))], plain("fd00:200:1::11"), to(), ALLOWED_A),
    Case("ipBlocks IPv6 host: written long, matched as an address", [allow(src(ipBlocks=["fd00:0200:0001:0::0011"]))],
         plain("fd00:200:1::11"), to(), ALLOWED_A),
    Case("ipBlocks IPv6 host bits ignored", [allow(src(ipBlocks=["fd00:200:1::11/48"]))], plain("fd00:200:1:ff::1"),
         to(), ALLOWED_A),
    Case("ipBlocks ::/0 vs an IPv4 peer", [allow(src(ipBlocks=["::/0"]))], plain("10.0.0.2"), to(), NO_MATCH),
    Case("ipBlocks ::/0 vs an IPv4-mapped peer (it is IPv4)", [allow(src(ipBlocks=["::/0"]))],
         plain("::ffff:10.0.0.2"), to(), NO_MATCH),
    Case("ipBlocks of both families: the IPv6 one", [allow(src(ipBlocks=["10.0.0.0/8", "fd00:200::/32"]))],
         plain("fd00:200:2::10"), to(), ALLOWED_A),
    Case("ipBlocks of both families: the IPv4 one", [allow(src(ipBlocks=["10.0.0.0/8", "fd00:200::/32"]))],
         plain("10.200.2.10"), to(), ALLOWED_A),
    Case("ipBlocks of both families: neither", [allow(src(ipBlocks=["10.0.0.0/8", "fd00:200::/32"]))],
         plain("fd00:201::1"), to(), NO_MATCH),
    Case("ipBlocks IPv6 peer with a zone", [allow(src(ipBlocks=["fe80::/64"]))], plain("fe80::1%eth0"), to(),
         ALLOWED_A),
    Case("notIpBlocks IPv6: inside", [allow(src(notIpBlocks=["fd00:200:1::/48"]))], plain("fd00:200:1::11"), to(),
         NO_MATCH),
    Case("notIpBlocks IPv6: outside", [allow(src(notIpBlocks=["fd00:200:1::/48"]))], plain("fd00:200:2::11"), to(),
         ALLOWED_A),
    Case("notIpBlocks IPv6: an IPv4 peer is outside it", [allow(src(notIpBlocks=["::/0"]))], plain("10.0.0.5"),
         to(), ALLOWED_A),
    Case("DENY ipBlocks IPv6", [deny(src(ipBlocks=["fd00:200:1::/48"]))], plain("fd00:200:1::11"), to(), DENIED_D),
    Case("DENY ipBlocks IPv6: the same pod's IPv4 address passes", [deny(src(ipBlocks=["fd00:200:1::/48"]))],
         plain("10.200.1.11"), to(), DEFAULT),
    Case("notIpBlocks: inside", [allow(src(notIpBlocks=["10.0.0.0/24"]))], plain("10.0.0.5"), to(), NO_MATCH),
    Case("notIpBlocks: outside", [allow(src(notIpBlocks=["10.0.0.0/24"]))], plain("192.168.1.1"), to(), ALLOWED_A),
    # -- a source: every field set must match ----------------------------------------------------------
    Case("source AND: both match", [allow(src(principals=[CLIENT], ipBlocks=["10.0.0.0/24"]))], mtls(), to(),
         ALLOWED_A),
    Case("source AND: principal but not ip", [allow(src(principals=[CLIENT], ipBlocks=["10.9.0.0/24"]))], mtls(),
         to(), NO_MATCH),
    Case("source AND: field and its not form", [allow(src(namespaces=["ba*"], notNamespaces=["baz"]))],
         mtls(ns="baz"), to(), NO_MATCH),
    Case("from OR: second source matches",
         [allow({"from": [{"source": {"namespaces": ["x"]}}, {"source": {"ipBlocks": ["10.0.0.0/8"]}}]})],
         mtls(), to(), ALLOWED_A),
    Case("from OR: none matches",
         [allow({"from": [{"source": {"namespaces": ["x"]}}, {"source": {"ipBlocks": ["11.0.0.0/8"]}}]})],
         mtls(), to(), NO_MATCH),
    # -- operation: ports ------------------------------------------------------------------------------
    Case("ports: match", [allow(op(ports=["80", "443"]))], mtls(), to(port=443), ALLOWED_A),
    Case("ports: other", [allow(op(ports=["80", "443"]))], mtls(), to(port=8080), NO_MATCH),
    Case("notPorts: listed", [allow(op(notPorts=["8080"]))], mtls(), to(port=8080), NO_MATCH),
    Case("notPorts: not listed", [allow(op(notPorts=["8080"]))], mtls(), to(port=80), ALLOWED_A),
    Case("ports and notPorts", [allow(op(ports=["80", "81"], notPorts=["81"]))], mtls(), to(port=81), NO_MATCH),
    Case("to OR: second operation",
         [allow({"to": [{"operation": {"ports": ["1"]}}, {"operation": {"ports": ["80"]}}]})], mtls(), to(port=80),
         ALLOWED_A),
    # -- when ------------------------------------------------------------------------------------------
    Case("when source.ip values", [allow(when("source.ip", ["10.0.0.0/16"]))], mtls(), to(), ALLOWED_A),
    Case("when source.ip values: outside", [allow(when("source.ip", ["10.5.0.0/16"]))], mtls(), to(), NO_MATCH),
    Case("when source.ip notValues", [allow(when("source.ip", not_values=["10.0.0.2"]))], mtls(), to(), NO_MATCH),
    Case("when source.namespace values prefix", [allow(when("source.namespace", ["ba*"]))], mtls(), to(),
         ALLOWED_A),
    Case("when source.namespace notValues", [allow(when("source.namespace", not_values=["bar"]))], mtls(), to(),
         NO_MATCH),
    Case("when source.namespace: plaintext", [allow(when("source.namespace", ["*"]))], plain(), to(), NO_MATCH),
    Case("when source.principal values suffix", [allow(when("source.principal", ["*/sa/client"]))], mtls(), to(),
         ALLOWED_A),
    Case("when source.principal notValues", [allow(when("source.principal", not_values=[CLIENT]))], mtls(), to(),
         NO_MATCH),
    Case("when destination.ip values", [allow(when("destination.ip", ["10.1.0.0/16"]))], mtls(), to(), ALLOWED_A),
    Case("when source.ip IPv6 values", [allow(when("source.ip", ["fd00:200::/32"]))], mtls(ip="fd00:200:1::11"),
         to(), ALLOWED_A),
    Case("when source.ip IPv6 values: an IPv4 peer", [allow(when("source.ip", ["fd00:200::/32"]))], mtls(), to(),
         NO_MATCH),
    Case("when source.ip IPv6 notValues", [allow(when("source.ip", not_values=["fd00:200:1::11"]))],
         mtls(ip="fd00:200:1::11"), to(), NO_MATCH),
    Case("when destination.ip IPv6 values", [allow(when("destination.ip", ["fd00:200:1::/48"]))], mtls(),
         to(ip="fd00:200:1::10"), ALLOWED_A),
    Case("when destination.ip IPv6 values: the IPv4 address of the pod", [allow(when("destination.ip",
                                                                                   ["fd00:200:1::/48"]))],
         mtls(), to(ip="10.200.1.10"), NO_MATCH),
    Case("when destination.ip IPv6 notValues", [allow(when("destination.ip", not_values=["fd00:200:1::10"]))],
         mtls(), to(ip="fd00:200:1::10"), NO_MATCH),
    Case("when destination.ip IPv4-mapped target is IPv4", [allow(when("destination.ip", ["10.1.0.0/16"]))], mtls(),
         to(ip="::ffff:10.1.0.1"), ALLOWED_A),
    Case("when destination.ip notValues", [allow(when("destination.ip", not_values=["10.1.0.1"]))], mtls(), to(),
         NO_MATCH),
    Case("when destination.port values", [allow(when("destination.port", ["80"]))], mtls(), to(port=80), ALLOWED_A),
    Case("when destination.port values: other", [allow(when("destination.port", ["80"]))], mtls(), to(port=81),
         NO_MATCH),
    Case("when destination.port notValues", [allow(when("destination.port", not_values=["81"]))], mtls(),
         to(port=81), NO_MATCH),
    Case("when values and notValues: both must hold",
         [allow(when("source.namespace", ["b*"], ["bar"]))], mtls(), to(), NO_MATCH),
    Case("when values and notValues: hold",
         [allow(when("source.namespace", ["b*"], ["baz"]))], mtls(), to(), ALLOWED_A),
    Case("when: every condition must hold",
         [allow({"when": [{"key": "source.namespace", "values": ["bar"]},
                          {"key": "destination.port", "values": ["443"]}]})], mtls(), to(port=80), NO_MATCH),
    # -- a rule: from AND to AND when; rules: any, the first reported ----------------------------------
    Case("rule: from matches, to does not", [allow({**src(namespaces=["bar"]), **op(ports=["443"])})], mtls(),
         to(port=80), NO_MATCH),
    Case("rule: from, to and when all match",
         [allow({**src(namespaces=["bar"]), **op(ports=["80"]), **when("source.ip", ["10.0.0.0/8"])})], mtls(),
         to(), ALLOWED_A),
    Case("rule: when fails", [allow({**src(namespaces=["bar"]), **when("source.ip", ["11.0.0.0/8"])})], mtls(),
         to(), NO_MATCH),
    Case("rules: the second matches", [allow(src(namespaces=["x"]), src(namespaces=["bar"]))], mtls(), to(),
         allowed_by("foo/a", 1)),
    Case("rules: the first of several matching", [allow(src(namespaces=["x"]), src(namespaces=["bar"]),
                                                        src(principals=["*"]))], mtls(), to(),
         allowed_by("foo/a", 1)),
    # -- scopes ----------------------------------------------------------------------------------------
    Case("root policy applies in every namespace", [allow(src(namespaces=["x"]), ns=ROOT)], mtls(), to(ns="baz"),
         NO_MATCH),
    Case("root policy applies in the root namespace", [deny({}, ns=ROOT)], mtls(), to(ns=ROOT),
         denied_by(f"{ROOT}/d")),
    Case("root selector: matching pod in any namespace",
         [deny({}, ns=ROOT, selector={"matchLabels": {"app": "db"}})], mtls(), to(ns="baz", app="db"),
         denied_by(f"{ROOT}/d")),
    Case("root selector: other pods untouched",
         [deny({}, ns=ROOT, selector={"matchLabels": {"app": "db"}})], mtls(), to(ns="baz", app="web"), DEFAULT),
    Case("namespace policy: not another namespace", [deny({})], mtls(), to(ns="baz"), DEFAULT),
    Case("namespace policy: every workload of its namespace", [deny({})], mtls(), to(app="anything"), DENIED_D),
    Case("selector: matching labels", [deny({}, selector={"matchLabels": {"app": "web"}})], mtls(),
         to(app="web", version="v1"), DENIED_D),
    Case("selector: other labels", [deny({}, selector={"matchLabels": {"app": "db"}})], mtls(), to(app="web"),
         DEFAULT),
    Case("selector: every label must match", [deny({}, selector={"matchLabels": {"app": "web", "version": "v2"}})],
         mtls(), to(app="web", version="v1"), DEFAULT),
    Case("selector: not another namespace", [deny({}, selector={"matchLabels": {"app": "web"}})], mtls(),
         to(ns="baz", app="web"), DEFAULT),
    Case("selector with no labels: the whole namespace", [deny({}, selector={"matchLabels": {}})], mtls(),
         to(app="x"), DENIED_D),
    Case("ALLOW policy of another workload does not apply",
         [allow(src(namespaces=["x"]), selector={"matchLabels": {"app": "db"}})], mtls(), to(app="web"), DEFAULT),
    # -- order: DENY first, then ALLOW -----------------------------------------------------------------
    Case("DENY wins over a matching ALLOW", [allow({}), deny(src(namespaces=["bar"]))], mtls(), to(), DENIED_D),
    Case("mesh-wide DENY wins over a namespace ALLOW", [allow({}), deny({}, ns=ROOT)], mtls(), to(),
         denied_by(f"{ROOT}/d")),
    Case("selector DENY wins over a namespace-wide ALLOW",
         [allow({}), deny({}, selector={"matchLabels": {"app": "web"}})], mtls(), to(), DENIED_D),
    Case("DENY not matching, ALLOW matching", [allow({}), deny(src(namespaces=["x"]))], mtls(), to(), ALLOWED_A),
    Case("DENY not matching, no ALLOW", [deny(src(namespaces=["x"]))], mtls(), to(), DEFAULT),
    Case("ALLOW policies add up", [allow(src(namespaces=["x"])), allow(src(namespaces=["bar"]), name="b")],
         mtls(), to(), allowed_by("foo/b")),
    Case("mesh-wide ALLOW and namespace ALLOW add up",
         [allow(src(namespaces=["x"]), ns=ROOT), allow(src(namespaces=["bar"]))], mtls(), to(), ALLOWED_A),
    # -- empty spec, empty rule -------------------------------------------------------------------------
    Case("spec {}: denies everything", [ap("a")], mtls(), to(), NO_MATCH),
    Case("spec {}: plaintext too", [ap("a")], plain(), to(), NO_MATCH),
    Case("spec {} with a selector: only those pods", [ap("a", selector={"matchLabels": {"app": "db"}})], mtls(),
         to(app="web"), DEFAULT),
    Case("spec {} and a matching ALLOW", [ap("a"), allow({}, name="b")], mtls(), to(), allowed_by("foo/b")),
    Case("ALLOW rule {}: allows everything", [allow({})], plain(), to(), ALLOWED_A),
    Case("ALLOW rule {} after others", [allow(src(namespaces=["x"]), {})], mtls(), to(), allowed_by("foo/a", 1)),
    Case("DENY rule {}: denies everything", [deny({})], mtls(), to(), DENIED_D),
    Case("ALLOW rules: [] is no rules", [ap("a", rules=[])], mtls(), to(), NO_MATCH),
    Case("empty lists are unset", [allow(src(namespaces=["bar"], ipBlocks=[]))], mtls(), to(), ALLOWED_A),
    # -- HTTP-only attributes: ALLOW rules never match, DENY rules enforced without them --------------------
    Case("ALLOW methods: never", [allow(op(methods=["GET"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW ports and methods: never", [allow(op(ports=["80"], methods=["GET"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW paths: never", [allow(op(paths=["/"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW hosts: never", [allow(op(hosts=["a.example"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW notMethods: never", [allow(op(notMethods=["DELETE"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW notPaths: never", [allow(op(notPaths=["/admin"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW notHosts: never", [allow(op(notHosts=["a.example"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW requestPrincipals: never", [allow(src(requestPrincipals=["*"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW notRequestPrincipals: never", [allow(src(notRequestPrincipals=["x/y"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW remoteIpBlocks: never", [allow(src(remoteIpBlocks=["0.0.0.0/0"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW remoteIpBlocks IPv6: never", [allow(src(remoteIpBlocks=["::/0"]))], mtls(ip="fd00::1"), to(),
         NO_MATCH),
    Case("ALLOW notRemoteIpBlocks: never", [allow(src(notRemoteIpBlocks=["1.2.3.4"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW namespaces and requestPrincipals: never", [allow(src(namespaces=["bar"], requestPrincipals=["*"]))],
         mtls(), to(), NO_MATCH),
    Case("ALLOW when request.headers: never", [allow(when("request.headers[x-user]", ["a"]))], mtls(), to(),
         NO_MATCH),
    Case("ALLOW when request.auth.claims: never", [allow(when("request.auth.claims[iss]", ["a"]))], mtls(), to(),
         NO_MATCH),
    Case("ALLOW when remote.ip: never", [allow(when("remote.ip", ["10.0.0.0/8"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW when connection.sni: never", [allow(when("connection.sni", ["a"]))], mtls(), to(), NO_MATCH),
    Case("ALLOW: an HTTP rule is skipped, the next one counts", [allow(op(methods=["GET"]), src(namespaces=["bar"]))],
         mtls(), to(), allowed_by("foo/a", 1)),
    Case("DENY methods only: denies everything", [deny(op(methods=["DELETE"]))], mtls(), to(), DENIED_D),
    Case("DENY ports and methods: on that port", [deny(op(ports=["80"], methods=["DELETE"]))], mtls(), to(port=80),
         DENIED_D),
    Case("DENY ports and methods: other ports", [deny(op(ports=["80"], methods=["DELETE"]))], mtls(), to(port=81),
         DEFAULT),
    Case("DENY principals and requestPrincipals: that principal",
         [deny(src(principals=[CLIENT], requestPrincipals=["*"]))], mtls(), to(), DENIED_D),
    Case("DENY principals and requestPrincipals: others",
         [deny(src(principals=[CLIENT], requestPrincipals=["*"]))], mtls(sa="x"), to(), DEFAULT),
    Case("DENY remoteIpBlocks IPv6 only: denies everything", [deny(src(remoteIpBlocks=["fd00::/8"]))],
         mtls(ip="10.0.0.9"), to(), DENIED_D),
    Case("DENY remoteIpBlocks only: denies everything", [deny(src(remoteIpBlocks=["1.2.3.4"]))], mtls(), to(),
         DENIED_D),
    Case("DENY notRequestPrincipals only: denies everything", [deny(src(notRequestPrincipals=["*"]))], plain(), to(),
         DENIED_D),
    Case("DENY when request.headers: dropped", [deny(when("request.headers[x]", ["y"]))], mtls(), to(), DENIED_D),
    Case("DENY when request.headers with a namespace: that namespace",
         [deny({**src(namespaces=["bar"]), **when("request.headers[x]", ["y"])})], mtls(), to(), DENIED_D),
    Case("DENY when request.headers with a namespace: others",
         [deny({**src(namespaces=["bar"]), **when("request.headers[x]", ["y"])})], mtls(ns="baz"), to(), DEFAULT),
    Case("DENY: one HTTP operation among others matches everything",
         [deny({"to": [{"operation": {"ports": ["9"]}}, {"operation": {"paths": ["/x"]}}]})], mtls(), to(port=80),
         DENIED_D),
    # -- targetRefs: for waypoints, not enforced here ---------------------------------------------------
    Case("targetRefs: not enforced", [ap("a", targetRefs=[{"kind": "Service", "group": "", "name": "web"}])],
         mtls(), to(), DEFAULT),
    Case("targetRef: not enforced", [ap("a", action="DENY", rules=[{}],
                                        targetRef={"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                                   "name": "waypoint"})], mtls(), to(), DEFAULT),
    # -- PeerAuthentication -----------------------------------------------------------------------------
    Case("mesh STRICT: plaintext denied", [pa("default", ROOT, "STRICT")], plain(), to(),
         strict(f"{ROOT}/default")),
    Case("mesh STRICT: mTLS allowed", [pa("default", ROOT, "STRICT")], mtls(), to(), DEFAULT),
    Case("mesh PERMISSIVE: plaintext allowed", [pa("default", ROOT, "PERMISSIVE")], plain(), to(), DEFAULT),
    Case("mesh DISABLE: plaintext allowed", [pa("default", ROOT, "DISABLE")], plain(), to(), DEFAULT),
    Case("mesh UNSET: PERMISSIVE", [pa("default", ROOT)], plain(), to(), DEFAULT),
    Case("namespace STRICT: plaintext denied", [pa("ns", "foo", "STRICT")], plain(), to(), strict("foo/ns")),
    Case("namespace STRICT: other namespaces untouched", [pa("ns", "foo", "STRICT")], plain(), to(ns="baz"),
         DEFAULT),
    Case("namespace PERMISSIVE over mesh STRICT", [pa("default", ROOT, "STRICT"), pa("ns", "foo", "PERMISSIVE")],
         plain(), to(), DEFAULT),
    Case("namespace DISABLE over mesh STRICT: PERMISSIVE", [pa("default", ROOT, "STRICT"), pa("ns", "foo", "DISABLE")],
         plain(), to(), DEFAULT),
    Case("namespace STRICT over mesh PERMISSIVE", [pa("default", ROOT, "PERMISSIVE"), pa("ns", "foo", "STRICT")],
         plain(), to(), strict("foo/ns")),
    Case("namespace UNSET inherits mesh STRICT", [pa("default", ROOT, "STRICT"), pa("ns", "foo")], plain(), to(),
         strict(f"{ROOT}/default")),
    Case("workload STRICT over namespace PERMISSIVE",
         [pa("ns", "foo", "PERMISSIVE"), pa("wl", "foo", "STRICT", selector={"matchLabels": {"app": "web"}})],
         plain(), to(), strict("foo/wl")),
    Case("workload PERMISSIVE over namespace STRICT",
         [pa("ns", "foo", "STRICT"), pa("wl", "foo", "PERMISSIVE", selector={"matchLabels": {"app": "web"}})],
         plain(), to(), DEFAULT),
    Case("workload PERMISSIVE over mesh STRICT",
         [pa("default", ROOT, "STRICT"), pa("wl", "foo", "PERMISSIVE", selector={"matchLabels": {"app": "web"}})],
         plain(), to(), DEFAULT),
    Case("workload selector not matching: namespace level applies",
         [pa("ns", "foo", "STRICT"), pa("wl", "foo", "PERMISSIVE", selector={"matchLabels": {"app": "db"}})],
         plain(), to(), strict("foo/ns")),
    Case("workload UNSET inherits",
         [pa("ns", "foo", "STRICT"), pa("wl", "foo", selector={"matchLabels": {"app": "web"}})], plain(), to(),
         strict("foo/ns")),
    Case("portLevelMtls PERMISSIVE under workload STRICT: that port",
         [pa("wl", "foo", "STRICT", selector={"matchLabels": {"app": "web"}},
             portLevelMtls={8080: {"mode": "PERMISSIVE"}})], plain(), to(port=8080), DEFAULT),
    Case("portLevelMtls PERMISSIVE under workload STRICT: other ports",
         [pa("wl", "foo", "STRICT", selector={"matchLabels": {"app": "web"}},
             portLevelMtls={8080: {"mode": "PERMISSIVE"}})], plain(), to(port=80), strict("foo/wl")),
    Case("portLevelMtls STRICT under workload PERMISSIVE: that port",
         [pa("wl", "foo", "PERMISSIVE", selector={"matchLabels": {"app": "web"}},
             portLevelMtls={"9090": {"mode": "STRICT"}})], plain(), to(port=9090), strict("foo/wl")),
    Case("portLevelMtls STRICT under workload PERMISSIVE: other ports",
         [pa("wl", "foo", "PERMISSIVE", selector={"matchLabels": {"app": "web"}},
             portLevelMtls={"9090": {"mode": "STRICT"}})], plain(), to(port=80), DEFAULT),
    Case("portLevelMtls PERMISSIVE, workload UNSET, namespace STRICT: that port",
         [pa("ns", "foo", "STRICT"),
          pa("wl", "foo", selector={"matchLabels": {"app": "web"}}, portLevelMtls={8080: {"mode": "PERMISSIVE"}})],
         plain(), to(port=8080), DEFAULT),
    Case("portLevelMtls PERMISSIVE, workload UNSET, namespace STRICT: other ports",
         [pa("ns", "foo", "STRICT"),
          pa("wl", "foo", selector={"matchLabels": {"app": "web"}}, portLevelMtls={8080: {"mode": "PERMISSIVE"}})],
         plain(), to(port=80), strict("foo/ns")),
    Case("portLevelMtls DISABLE under mesh STRICT: PERMISSIVE",
         [pa("default", ROOT, "STRICT"),
          pa("wl", "foo", selector={"matchLabels": {"app": "web"}}, portLevelMtls={8080: {"mode": "DISABLE"}})],
         plain(), to(port=8080), DEFAULT),
    Case("portLevelMtls UNSET inherits the workload's mode",
         [pa("wl", "foo", "STRICT", selector={"matchLabels": {"app": "web"}}, portLevelMtls={8080: {}})],
         plain(), to(port=8080), strict("foo/wl")),
    Case("STRICT: checked before ALLOW policies", [pa("ns", "foo", "STRICT"), allow({})], plain(), to(),
         strict("foo/ns")),
    Case("STRICT: then ALLOW policies for mTLS", [pa("ns", "foo", "STRICT"), allow(src(namespaces=["x"]))], mtls(),
         to(), NO_MATCH),
    Case("PERMISSIVE: plaintext still subject to ALLOW policies",
         [pa("ns", "foo", "PERMISSIVE"), allow(src(namespaces=["bar"]))], plain(), to(), NO_MATCH),
    Case("root selector PeerAuthentication: root namespace pods",
         [pa("wl", ROOT, "STRICT", selector={"matchLabels": {"app": "web"}})], plain(), to(ns=ROOT),
         strict(f"{ROOT}/wl")),
    Case("root selector PeerAuthentication: not other namespaces",
         [pa("wl", ROOT, "STRICT", selector={"matchLabels": {"app": "web"}})], plain(), to(ns="baz"), DEFAULT),
    Case("the oldest namespace-wide PeerAuthentication wins",
         [pa("new", "foo", "PERMISSIVE", created="2024-02-01T00:00:00Z"),
          pa("old", "foo", "STRICT", created="2024-01-01T00:00:00Z")], plain(), to(), strict("foo/old")),
    Case("the oldest namespace-wide PeerAuthentication wins (PERMISSIVE)",
         [pa("new", "foo", "STRICT", created="2024-02-01T00:00:00Z"),
          pa("old", "foo", "PERMISSIVE", created="2024-01-01T00:00:00Z")], plain(), to(), DEFAULT),
    Case("the oldest workload PeerAuthentication wins",
         [pa("b", "foo", "PERMISSIVE", created="2024-02-01T00:00:00Z", selector={"matchLabels": {"app": "web"}}),
          pa("a", "foo", "STRICT", created="2024-03-01T00:00:00Z", selector={"matchLabels": {"app": "web"}})],
         plain(), to(), DEFAULT),
    Case("same age: by name", [pa("b", "foo", "PERMISSIVE"), pa("a", "foo", "STRICT")], plain(), to(),
         strict("foo/a")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decision(case: Case) -> None:
    engine = PolicyEngine(ROOT)
    assert engine.update(case.objects) == []
    decision = engine.evaluate(case.peer, case.target)
    assert (decision.allowed, decision.policy, decision.rule) == case.expected, decision.reason
    assert engine.evaluate(case.peer, case.target) == decision  # the cached path decides alike


def test_case_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES)


# -- reasons ------------------------------------------------------------------------------------------


def decide(objects: list[dict[str, Any]], peer: Peer, target: Target, root: str = ROOT) -> Decision:
    engine = PolicyEngine(root)
    assert engine.update(objects) == []
    return engine.evaluate(peer, target)


def test_reason_names_the_policy_and_rule() -> None:
    d = decide([deny(src(namespaces=["x"]), src(namespaces=["bar"]), name="deny-x")], mtls(), to())
    assert d == Decision(False, "AuthorizationPolicy foo/deny-x", 1, "denied by AuthorizationPolicy foo/deny-x rule 1")
    a = decide([allow({}, name="allow-all")], mtls(), to())
    assert a == Decision(True, "AuthorizationPolicy foo/allow-all", 0,
                         "allowed by AuthorizationPolicy foo/allow-all rule 0")


def test_reason_without_a_match_names_the_allow_policies() -> None:
    d = decide([allow(src(namespaces=["x"]), name="one"), allow(src(namespaces=["y"]), name="two", ns=ROOT)],
               mtls(), to())
    assert d.reason.startswith("no ALLOW policy matched") and "foo/one" in d.reason and f"{ROOT}/two" in d.reason
    assert d.policy is None and d.rule is None
    many = decide([allow(src(namespaces=["x"]), name=f"p{i}") for i in range(5)], mtls(), to())
    assert many.reason.endswith(", ...)")


def test_reason_by_default() -> None:
    assert decide([], mtls(), to()).reason == "allowed: no policy applies"


def test_reason_of_peer_authentication() -> None:
    d = decide([pa("default", ROOT, "STRICT")], plain(), to())
    assert d.reason == (f"denied by PeerAuthentication {ROOT}/default: mTLS is STRICT and the connection has no "
                        "mTLS peer identity")
    port = decide([pa("wl", "foo", "PERMISSIVE", selector={"matchLabels": {"app": "web"}},
                      portLevelMtls={"9090": {"mode": "STRICT"}})], plain(), to(port=9090))
    assert "STRICT on port 9090" in port.reason and port.policy == "PeerAuthentication foo/wl"


# -- engine behaviour ---------------------------------------------------------------------------------


def test_root_namespace_is_configurable() -> None:
    objects = [deny({}, ns="istio-config"), pa("default", "istio-config", "STRICT")]
    assert decide(objects, mtls(), to(), root="istio-config") == Decision(
        False, "AuthorizationPolicy istio-config/d", 0, "denied by AuthorizationPolicy istio-config/d rule 0")
    assert decide(objects, plain(), to(), root="istio-config").policy == "PeerAuthentication istio-config/default"
    # with the default root, istio-config is an ordinary namespace
    assert decide(objects, mtls(), to()).allowed
    assert decide(objects, plain(), to()).allowed


def test_update_replaces_the_whole_set() -> None:
    engine = PolicyEngine()
    engine.update([deny({}), pa("default", ROOT, "STRICT")])
    assert not engine.evaluate(mtls(), to()).allowed
    assert not engine.evaluate(plain(), to()).allowed
    engine.update([allow(src(namespaces=["bar"]))])
    assert engine.evaluate(mtls(), to()).policy == "AuthorizationPolicy foo/a"
    assert engine.evaluate(plain(), to()) == Decision(False, None, None, "no ALLOW policy matched (foo/a)")
    engine.update([])
    assert engine.evaluate(plain(), to()).reason == "allowed: no policy applies"
    assert engine.policies == []


def test_policies_in_force() -> None:
    engine = PolicyEngine()
    errors = engine.update([
        allow({}), deny({}, ns=ROOT), pa("default", ROOT, "STRICT"),
        ap("waypoint", targetRefs=[{"kind": "Service", "name": "web"}]),
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "foo"}},
        ap("bad", action="AUDIT"),
    ])
    assert [e.object for e in errors] == ["AuthorizationPolicy foo/bad"]
    assert engine.policies == ["AuthorizationPolicy foo/a", f"AuthorizationPolicy {ROOT}/d",
                               f"PeerAuthentication {ROOT}/default"]


def test_other_kinds_and_groups_are_ignored() -> None:
    engine = PolicyEngine()
    errors = engine.update([
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "foo"}},
        {"apiVersion": "example.com/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "x", "namespace": "foo"},
         "spec": {"whatever": True}},
        "not an object",  # type: ignore[list-item]
        None,  # type: ignore[list-item]
    ])
    assert errors == [] and engine.policies == []


def test_objects_without_api_version_or_namespace() -> None:
    engine = PolicyEngine()
    assert engine.update([{"kind": "AuthorizationPolicy", "metadata": {"name": "x"}, "spec": {}},
                          {"apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
                           "metadata": {"name": "y"}, "spec": {"mtls": {"mode": "STRICT"}}}]) == []
    assert engine.policies == ["AuthorizationPolicy default/x", "PeerAuthentication default/y"]
    assert not engine.evaluate(mtls(), to(ns="default")).allowed


def test_duplicates_keep_the_first() -> None:
    engine = PolicyEngine()
    errors = engine.update([deny({}), allow({}, name="d")])
    assert [str(e) for e in errors] == ["AuthorizationPolicy foo/d: given more than once; the first one is in force"]
    assert not engine.evaluate(mtls(), to()).allowed


def test_http_attributes_are_noted_each_load(caplog: pytest.LogCaptureFixture) -> None:
    engine = PolicyEngine()
    objects = [allow(op(methods=["GET"]), src(namespaces=["bar"]), name="web-get"),
               deny(op(ports=["80"], paths=["/admin"]), name="no-admin")]
    with caplog.at_level(logging.WARNING, logger="agent.policy"):
        engine.update(objects)
        engine.update(objects)  # the same set: not loaded again
        engine.update([*objects, deny({}, name="other")])
    allow_notes = [r.getMessage() for r in caplog.records if "foo/web-get" in r.getMessage()]
    deny_notes = [r.getMessage() for r in caplog.records if "foo/no-admin" in r.getMessage()]
    assert len(allow_notes) == 2 and len(deny_notes) == 2
    assert "methods" in allow_notes[0] and "rule(s) 0" in allow_notes[0] and "never match" in allow_notes[0]
    assert "paths" in deny_notes[0] and "without them" in deny_notes[0]
    assert len(engine.notes) == 2


def test_an_unchanged_set_changes_nothing() -> None:
    engine = PolicyEngine()
    objects: list[dict[str, Any]] = [deny(src(namespaces=["bar"])), ap("bad", action="AUDIT")]
    first = engine.update(objects)
    assert [e.object for e in first] == ["AuthorizationPolicy foo/bad"]
    index = engine._index
    assert engine.evaluate(mtls(), to()).policy == "AuthorizationPolicy foo/d"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "foo"}}
    assert engine.update([pod, *copy.deepcopy(objects)]) == first  # equal objects; other kinds do not count
    assert engine._index is index
    engine.evaluate(mtls(), to())
    assert engine.update(objects) == first  # references held by the engine's own structures do not matter
    assert engine._index is index
    objects[0]["spec"]["rules"][0]["from"][0]["source"]["namespaces"] = ["baz"]  # changed in place
    assert engine.update(objects) == first
    assert engine._index is not index
    assert engine.evaluate(mtls(), to()).allowed and not engine.evaluate(mtls(ns="baz"), to()).allowed


def test_objects_from_yaml() -> None:
    """Unquoted timestamps come as datetimes: ages compare with quoted ones, and the set still snapshots."""
    objects = list(yaml.safe_load_all("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: newer, namespace: foo, creationTimestamp: 2024-03-01T10:00:00Z}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: older, namespace: foo, creationTimestamp: "2024-02-01T10:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ports, namespace: foo}
spec:
  rules:
  - to: [{operation: {ports: ["80"]}}]
"""))
    assert isinstance(objects[0]["metadata"]["creationTimestamp"], datetime.datetime)
    engine = PolicyEngine()
    assert engine.update(objects) == []
    assert engine.evaluate(plain(), to()).policy == "PeerAuthentication foo/older"
    index = engine._index
    assert engine.update(objects) == [] and engine._index is index
    assert engine.evaluate(mtls(), to(port=80)).policy == "AuthorizationPolicy foo/ports"


def test_objects_of_any_mapping_type() -> None:
    spec = {"rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]}
    obj = MappingProxyType({**ap("a"), "spec": spec})
    engine = PolicyEngine()
    assert engine.update([obj]) == [] and engine.policies == ["AuthorizationPolicy foo/a"]
    index = engine._index
    assert engine.update([obj]) == [] and engine._index is index
    spec["rules"][0]["from"][0]["source"]["namespaces"] = ["baz"]
    engine.update([obj])
    assert engine._index is not index and engine.evaluate(mtls(ns="baz"), to()).allowed


def test_target_refs_are_noted(caplog: pytest.LogCaptureFixture) -> None:
    engine = PolicyEngine()
    with caplog.at_level(logging.INFO, logger="agent.policy"):
        assert engine.update([ap("wp", targetRefs=[{"kind": "Service", "name": "web"}])]) == []
    assert any("foo/wp" in r.getMessage() and "waypoint" in r.getMessage() for r in caplog.records)
    assert engine.policies == []


def test_other_notes() -> None:
    engine = PolicyEngine()
    engine.update([pa("a", "foo", "DISABLE"), pa("b", "foo", "STRICT"),
                   allow(src(principals=["spiffe://" + CLIENT, "a*b"]))])
    notes = "\n".join(engine.notes)
    assert "DISABLE is treated as PERMISSIVE" in notes
    assert "PeerAuthentication foo/b: not used, foo/a is older" in notes
    assert "without spiffe://" in notes and "matched literally" in notes


def test_labels_changed_in_place_are_seen() -> None:
    engine = PolicyEngine()
    engine.update([deny({}, selector={"matchLabels": {"app": "db"}})])
    labels = {"app": "web"}
    target = Target("foo", labels, "10.1.0.1", 80)
    assert engine.evaluate(mtls(), target).allowed
    labels["app"] = "db"
    assert not engine.evaluate(mtls(), target).allowed
    del labels["app"]
    assert engine.evaluate(mtls(), target).allowed


def test_labels_of_any_mapping_type() -> None:
    class Labels(Mapping[str, str]):
        def __init__(self, **items: str) -> None:
            self._items = items

        def __getitem__(self, key: str) -> str:
            return self._items[key]

        def __iter__(self) -> Any:
            return iter(self._items)

        def __len__(self) -> int:
            return len(self._items)

    engine = PolicyEngine()
    engine.update([deny({}, selector={"matchLabels": {"app": "db"}})])
    assert not engine.evaluate(mtls(), Target("foo", Labels(app="db", v="1"), "10.1.0.1", 80)).allowed
    assert engine.evaluate(mtls(), Target("foo", Labels(app="web"), "10.1.0.1", 80)).allowed


def test_same_labels_in_another_namespace() -> None:
    engine = PolicyEngine()
    engine.update([deny({})])
    labels = {"app": "web"}
    assert not engine.evaluate(mtls(), Target("foo", labels, "10.1.0.1", 80)).allowed
    assert engine.evaluate(mtls(), Target("baz", labels, "10.1.0.1", 80)).allowed


def test_unparsable_addresses_match_no_block() -> None:
    engine = PolicyEngine()
    engine.update([allow(src(ipBlocks=["0.0.0.0/0", "::/0"])), deny(src(notIpBlocks=["0.0.0.0/0", "::/0"]))])
    assert engine.evaluate(plain("not-an-ip"), to()).policy == "AuthorizationPolicy foo/d"
    assert engine.evaluate(plain("10.0.0.1"), to()).policy == "AuthorizationPolicy foo/a"


# -- compilation: the generated code decides as the plain reading of the rules ------------------------


def test_specialize_decides_port_tests() -> None:
    port80 = Check("port", frozenset({80}))
    not80 = Check("port", frozenset({80}), negate=True)
    ns = Check("namespace", StringSet.of(["bar"]))
    assert specialize(((( port80, ns),),), 80) == (((ns,),),)
    assert specialize((((port80, ns),),), 81) is None
    assert specialize((((not80,),),), 81) == ()
    assert specialize((((not80,), (ns,)),), 80) == (((ns,),),)
    assert specialize((((port80,), (ns,)),), 80) == ()


def _random_condition(rng: random.Random) -> Condition:
    def check() -> Check:
        kinds: list[Attribute] = ["principal", "namespace", "service_account", "source_ip", "destination_ip", "port"]
        kind = rng.choice(kinds)
        negate = rng.random() < 0.3
        if kind == "port":
            return Check("port", frozenset(rng.sample([80, 81, 443, 8080], rng.randint(1, 2))), negate)
        if kind in ("source_ip", "destination_ip"):
            blocks = rng.sample(["10.0.0.0/8", "10.1.0.0/16", "10.0.0.2", "fd00::/8", "::ffff:10.1.0.0/112"], 2)
            return Check(kind, IpSet.of(parse_block(b) for b in blocks), negate)
        if kind == "service_account":
            return Check(kind, frozenset(rng.sample(["/ns/bar/sa/client", "/ns/foo/sa/web", "/ns/baz/sa/x"], 2)),
                        negate)
        pool = {"principal": [CLIENT, "cluster.local/ns/foo/*", "*/sa/x", "*"],
                "namespace": ["bar", "fo*", "*z", "*"]}[kind]
        return Check(kind, StringSet.of(rng.sample(pool, rng.randint(1, 2))), negate)

    return tuple(tuple(tuple(check() for _ in range(rng.randint(0, 2))) for _ in range(rng.randint(0, 2)))
                 for _ in range(rng.randint(0, 3)))


def test_compiled_rules_decide_as_their_plain_reading() -> None:
    rng = random.Random(7)
    peers = [mtls(), mtls(ns="foo", sa="web", ip="10.1.2.3"), mtls(ns="baz", sa="x", ip="fd00::5"), plain(),
             plain("::ffff:10.1.0.9"), plain("192.168.0.1")]
    targets = [to(port=p, ip=ip) for p in (80, 81, 443, 8080, 9) for ip in ("10.1.0.1", "fd00::1", "172.16.0.1")]
    for _ in range(150):
        rules = [(_random_condition(rng), Decision(False, "p", i, f"rule {i}")) for i in range(rng.randint(1, 4))]
        group = RuleGroup(rules, "random")
        for port in {t.port for t in targets}:
            unspecialized, specialized = compile_rules(rules), compile_rules(group.rules_for(port))
            for peer in peers:
                for target in (t for t in targets if t.port == port):
                    expected = next((d for c, d in rules if holds(c, peer, target)), None)
                    assert unspecialized(peer, target) == expected, (rules, peer, target)
                    assert specialized(peer, target) == expected, (rules, peer, target)
