"""The L4 projection: what ztunnel enforces of the policies ``objects`` read, as istiod's ambient
translation hands them to it.

* A policy with targetRef(s) is for a waypoint or a gateway: istiod gives ztunnel none of them, so it is kept
  aside (``Projection.waypoint``) and noted, not enforced.
* Only ALLOW and DENY reach ztunnel: AUDIT and CUSTOM are refused with an error, as istiod marks them
  ("ztunnel does not support the ... action").
* HTTP attributes, which L4 cannot see: an ALLOW rule using any of them never matches; a DENY rule is
  enforced without them, so a source or an operation left with no L4 field matches everything, and a
  ``when`` condition on an HTTP attribute is dropped. Each such policy gets a note.
* PeerAuthentication is taken as it is; DISABLE, which ambient mode reads as PERMISSIVE, is noted.

What is enforced is compiled once into conditions (see ``matchers``) with ready-made decisions, which
``compiler`` turns into code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.policy import matchers
from agent.policy.matchers import Alternative, Check, Clause, Condition, IpSet, StringSet
from agent.policy.model import Decision, PolicyError
from agent.policy.objects import (
    ALLOW,
    AUDIT,
    CUSTOM,
    DISABLE,
    AuthorizationPolicy,
    Labels,
    Note,
    Operation,
    PeerAuthentication,
    Policy,
    Rule,
    Source,
    port_number,
)
from agent.policy.objects import Condition as When

_WHEN_L4 = ("source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port")


@dataclass(frozen=True, slots=True)
class L4Rule:
    """One rule as enforced at L4: its index in ``spec.rules``, its condition, and the decision when it holds."""

    index: int
    condition: Condition
    decision: Decision


@dataclass(frozen=True)
class L4Policy:
    """An AuthorizationPolicy (ALLOW or DENY, no targetRefs) as ztunnel enforces it."""

    policy: AuthorizationPolicy
    rules: tuple[L4Rule, ...]  # the rules that can match at L4, in order

    @property
    def namespace(self) -> str:
        return self.policy.namespace

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def action(self) -> str:
        return self.policy.action

    @property
    def selector(self) -> Labels | None:
        return self.policy.selector

    @property
    def ref(self) -> str:
        return self.policy.ref


@dataclass
class Projection:
    """What ztunnel enforces of a set of policies, what it leaves to waypoints, and what it refuses."""

    policies: list[L4Policy] = field(default_factory=list)
    authentications: list[PeerAuthentication] = field(default_factory=list)
    waypoint: list[AuthorizationPolicy] = field(default_factory=list)  # targetRef(s): not enforced here
    errors: list[PolicyError] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)  # each object's own notes, then what the projection adds


def project(values: Iterable[Policy]) -> Projection:
    """The L4 projection of accepted policies (see ``objects.read_all``), in their order."""
    out = Projection()
    for value in values:
        if isinstance(value, PeerAuthentication):
            out.notes += value.notes
            if DISABLE in (value.mode, *value.ports.values()):
                out.notes.append((logging.INFO, f"{value.ref}: mode DISABLE is treated as PERMISSIVE in ambient mode"))
            out.authentications.append(value)
        elif value.target_refs:
            out.notes += value.notes
            out.notes.append((logging.INFO, f"{value.ref}: has targetRefs, so it is for waypoints and is not "
                                            "enforced at L4"))
            out.waypoint.append(value)
        elif value.action in (AUDIT, CUSTOM):
            out.errors.append(PolicyError(value.ref, "spec.action", f"{value.action} is not supported at L4: only "
                                          f"ALLOW and DENY are enforced here (ztunnel rejects {value.action}; use a "
                                          "waypoint)"))
        else:
            policy, notes = _authorization(value)
            out.notes += notes
            out.policies.append(policy)
    return out


def _authorization(policy: AuthorizationPolicy) -> tuple[L4Policy, list[Note]]:
    rules: list[L4Rule] = []
    http_by_rule: dict[int, list[str]] = {}
    for index, rule in enumerate(policy.rules):
        clauses, http = _rule(rule)
        if http:
            http_by_rule[index] = sorted(set(http))
        if http and policy.action == ALLOW:
            continue  # never matches at L4
        verb = "allowed" if policy.action == ALLOW else "denied"
        decision = Decision(policy.action == ALLOW, policy.ref, index, f"{verb} by {policy.ref} rule {index}")
        rules.append(L4Rule(index, clauses, decision))
    notes = list(policy.notes)
    if http_by_rule:
        found = sorted({a for attrs in http_by_rule.values() for a in attrs})
        where = ", ".join(str(i) for i in http_by_rule)
        consequence = ("ALLOW rules using them never match here" if policy.action == ALLOW else
                       "DENY rules are enforced without them, which denies more than requested")
        notes.append((logging.WARNING, f"{policy.ref}: uses HTTP attributes that L4 cannot see ({', '.join(found)}) "
                                       f"in rule(s) {where}: {consequence}; use a waypoint to enforce HTTP rules"))
    return L4Policy(policy, tuple(rules)), notes


def _rule(rule: Rule) -> tuple[Condition, list[str]]:
    """A rule's L4 condition (``from``, then ``to``, then each ``when``), and the HTTP attributes it uses."""
    clauses: list[Clause] = []
    http: list[str] = []
    for alternatives, found in (_sources(rule.sources), _operations(rule.operations)):
        http += found
        if alternatives:
            clause = matchers.clause(alternatives)
            if clause is not None:
                clauses.append(clause)
    for when in rule.conditions:
        if when.key not in _WHEN_L4:
            http.append(when.key)
        elif alternative := _when(when):
            clauses.append((alternative,))
    return tuple(clauses), http


def _sources(sources: tuple[Source, ...]) -> tuple[list[Alternative], list[str]]:
    """Each source as one alternative (its L4 fields, ANDed), and the HTTP fields they use."""
    alternatives: list[Alternative] = []
    http: list[str] = []
    for s in sources:
        checks: list[Check] = []
        for values, negate in ((s.principals, False), (s.not_principals, True)):
            if values:
                checks.append(Check("principal", StringSet.of(values), negate))
        for values, negate in ((s.namespaces, False), (s.not_namespaces, True)):
            if values:
                checks.append(Check("namespace", StringSet.of(values), negate))
        for accounts, negate in ((s.service_accounts, False), (s.not_service_accounts, True)):
            if accounts:
                tails = frozenset(f"/ns/{a.namespace}/sa/{a.name}" for a in accounts)
                checks.append(Check("service_account", tails, negate))
        for blocks, negate in ((s.ip_blocks, False), (s.not_ip_blocks, True)):
            if blocks:
                checks.append(Check("source_ip", IpSet.of(blocks), negate))
        alternatives.append(tuple(checks))
        http += [name for name, given in (("requestPrincipals", s.request_principals),
                                          ("notRequestPrincipals", s.not_request_principals),
                                          ("remoteIpBlocks", s.remote_ip_blocks),
                                          ("notRemoteIpBlocks", s.not_remote_ip_blocks)) if given]
    return alternatives, http


def _operations(operations: tuple[Operation, ...]) -> tuple[list[Alternative], list[str]]:
    """Each operation as one alternative (its ports), and the HTTP fields they use."""
    alternatives: list[Alternative] = []
    http: list[str] = []
    for op in operations:
        checks = [Check("port", frozenset(ports), negate)
                  for ports, negate in ((op.ports, False), (op.not_ports, True)) if ports]
        alternatives.append(tuple(checks))
        http += [name for name, given in (("hosts", op.hosts), ("notHosts", op.not_hosts), ("methods", op.methods),
                                          ("notMethods", op.not_methods), ("paths", op.paths),
                                          ("notPaths", op.not_paths)) if given]
    return alternatives, http


def _when(when: When) -> Alternative:
    """An L4 ``when`` condition as one alternative: values, and not notValues."""
    checks: list[Check] = []
    for values, negate in ((when.values, False), (when.not_values, True)):
        if not values:
            continue
        if when.key in ("source.ip", "destination.ip"):
            blocks = IpSet.of(matchers.parse_block(v) for v in values)
            checks.append(Check("source_ip" if when.key == "source.ip" else "destination_ip", blocks, negate))
        elif when.key == "destination.port":
            checks.append(Check("port", frozenset(p for v in values if (p := port_number(v)) is not None), negate))
        elif when.key == "source.namespace":
            checks.append(Check("namespace", StringSet.of(values), negate))
        else:  # source.principal
            checks.append(Check("principal", StringSet.of(values), negate))
    return tuple(checks)
