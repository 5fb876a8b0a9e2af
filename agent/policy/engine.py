"""The policy engine: the accepted policies indexed by scope, and one decision per connection.

Evaluation order (ztunnel's): PeerAuthentication first (STRICT and no mTLS peer identity: deny), then any
matching DENY rule denies, then, if any ALLOW policy applies to the workload, one of its rules must match;
if none applies, allow.

Which policies apply depends only on the destination's namespace and labels: a ``Scope`` works that out
once per (namespace, labels). For each destination port of a scope, one function is compiled (see
``compiler``) holding all of it: the PeerAuthentication verdict on plaintext for that port, the DENY rules
that can apply to that port, then the ALLOW rules, then the decision when none matched. Scopes that come to
the same rules for a port share the function. Evaluating a connection is then two dictionary lookups (the
first keyed by the identity of the labels mapping, checked against a copy of its content) and one call.
Everything is worked out on first use and dropped at the next update.
"""

from __future__ import annotations

import logging
import pickle
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from agent.policy.compiler import RuleGroup, compile_rules
from agent.policy.l4 import L4Policy, project
from agent.policy.model import Decision, Peer, PolicyError, Target
from agent.policy.objects import (
    DENY,
    KINDS,
    PERMISSIVE,
    STRICT,
    UNSET,
    AuthorizationPolicy,
    Note,
    PeerAuthentication,
    read_all,
)

log = logging.getLogger(__name__)

ALLOWED_BY_DEFAULT = Decision(True, None, None, "allowed: no policy applies")
_SCOPES_MAX = 1 << 16  # cached (namespace, labels); the cache is emptied when it grows past this
_PORTS_MAX = 1 << 10  # cached ports per scope, likewise

Labels = frozenset[tuple[str, str]]
Key = tuple[str, tuple[tuple[str, str], ...]]  # (namespace, labels.items() in their order)


Decide = Callable[[Peer, Target], Decision]


@dataclass
class Scope:
    """What applies to workloads with one namespace and one set of labels, and the function deciding each
    destination port of theirs seen so far."""

    deny: tuple[RuleGroup, ...]
    allow: tuple[RuleGroup, ...]
    otherwise: Decision  # when no rule matched: allowed if no ALLOW policy applies, else denied
    plaintext: Decision | None  # PeerAuthentication's verdict on plaintext, and its port-level exceptions
    plaintext_ports: Mapping[int, Decision | None]
    ports: dict[int, Decide] = field(default_factory=dict)


def _short(ref: str) -> str:
    return ref.partition(" ")[2]


def _rules(policies: Iterable[L4Policy], name: str) -> RuleGroup:
    return RuleGroup([(r.condition, r.decision) for p in policies for r in p.rules], name)


@dataclass(frozen=True)
class _Base:
    """The policies without a selector that apply to a whole namespace (its own and the mesh-wide ones)."""

    deny: RuleGroup
    allow: RuleGroup
    allowing: tuple[L4Policy, ...]  # its ALLOW policies (some may have no rule that can match)

    @classmethod
    def of(cls, policies: list[L4Policy], name: str) -> _Base:
        allowing = tuple(p for p in policies if p.action != DENY)
        return cls(_rules((p for p in policies if p.action == DENY), f"DENY {name}"),
                   _rules(allowing, f"ALLOW {name}"), allowing)


def _plaintext_decision(mode: str, source: PeerAuthentication | None, port: int | None) -> Decision | None:
    if mode != STRICT or source is None:  # PERMISSIVE, or DISABLE, which ambient mode reads as PERMISSIVE
        return None
    where = f" on port {port}" if port is not None else ""
    return Decision(False, source.ref, None,
                    f"denied by {source.ref}: mTLS is STRICT{where} and the connection has no mTLS peer identity")


class _Index:
    """One update's policies by scope, and the cache of scopes."""

    def __init__(self, root: str, policies: Iterable[L4Policy],
                 authentications: Iterable[PeerAuthentication]) -> None:
        self.root = root
        mesh_wide: list[L4Policy] = []
        namespace_wide: dict[str, list[L4Policy]] = defaultdict(list)
        self.selected: dict[str, list[tuple[L4Policy, RuleGroup]]] = defaultdict(list)  # by namespace
        for policy in sorted(policies, key=lambda p: (p.namespace, p.name)):
            if policy.selector is not None:
                self.selected[policy.namespace].append((policy, _rules([policy], policy.ref)))
            elif policy.namespace == root:
                mesh_wide.append(policy)
            else:
                namespace_wide[policy.namespace].append(policy)
        self.mesh_selected = self.selected.pop(root, [])
        self.mesh_base = _Base.of(mesh_wide, "mesh-wide")
        self.bases = {ns: _Base.of(mesh_wide + own, ns) for ns, own in namespace_wide.items()}

        # PeerAuthentication: the oldest of each level wins (creationTimestamp, then name), as in istiod
        self.mesh_mtls: PeerAuthentication | None = None
        self.namespace_mtls: dict[str, PeerAuthentication] = {}
        self.workload_mtls: dict[str, list[PeerAuthentication]] = defaultdict(list)
        self.notes: list[Note] = []
        for pa in sorted(authentications, key=lambda p: p.age):
            if pa.selector is not None:
                self.workload_mtls[pa.namespace].append(pa)
                continue
            if pa.namespace == root:
                shadowing = self.mesh_mtls
                self.mesh_mtls = shadowing or pa
            else:
                shadowing = self.namespace_mtls.get(pa.namespace)
                self.namespace_mtls.setdefault(pa.namespace, pa)
            if shadowing is not None:
                level = "mesh-wide" if pa.namespace == root else "namespace-wide"
                self.notes.append((logging.WARNING, f"{pa.ref}: not used, {_short(shadowing.ref)} is older and "
                                                    f"also {level}"))
        self.scopes: dict[Key, Scope] = {}
        self.deciders: dict[Hashable, Decide] = {}  # compiled, by what they decide: see at()
        # id(labels) -> (labels, a copy of them, namespace, the scope's ports): holding ``labels`` keeps its id
        # from being reused, and comparing the copy catches a mapping changed in place
        self.by_labels: dict[int, tuple[Mapping[str, str], dict[str, str], str, dict[int, Decide]]] = {}

    def remember(self, namespace: str, labels: Mapping[str, str]) -> dict[int, Decide]:
        """The ports of the scope of (namespace, labels), remembered under this labels object."""
        key = (namespace, tuple(labels.items()))
        scope = self.scopes.get(key) or self.scope(key)
        if len(self.by_labels) >= _SCOPES_MAX:
            self.by_labels.clear()
        self.by_labels[id(labels)] = (labels, dict(labels), namespace, scope.ports)
        return scope.ports

    def at(self, namespace: str, labels: Mapping[str, str], port: int) -> Decide:
        """The function deciding connections to ``port`` of workloads with this namespace and labels,
        compiled on first use; scopes that come to the same rules for a port share one."""
        key = (namespace, tuple(labels.items()))
        scope = self.scopes.get(key) or self.scope(key)
        plaintext = scope.plaintext_ports.get(port, scope.plaintext)
        shape = (tuple((g, g.port_key(port)) for g in scope.deny), tuple((g, g.port_key(port)) for g in scope.allow),
                 plaintext, scope.otherwise)
        decide = self.deciders.get(shape)
        if decide is None:
            rules = [rule for g in scope.deny + scope.allow for rule in g.rules_for(port)]  # DENY first
            compiled = compile_rules(rules, f"{namespace} port {port}", plaintext=plaintext, otherwise=scope.otherwise)
            decide = cast(Decide, compiled)  # with ``otherwise`` set, it always returns a Decision
            if len(self.deciders) >= _SCOPES_MAX:
                self.deciders.clear()
            self.deciders[shape] = decide
        if len(scope.ports) >= _PORTS_MAX:
            scope.ports.clear()
        scope.ports[port] = decide
        return decide

    def scope(self, key: Key) -> Scope:
        """Work out (and remember) what applies to workloads with this namespace and these labels."""
        namespace, items = key
        labels = frozenset(items)
        base = self.mesh_base if namespace == self.root else self.bases.get(namespace, self.mesh_base)
        deny, allow, allowing = [base.deny], [base.allow], list(base.allowing)
        selected = self.mesh_selected
        if namespace != self.root:
            selected = selected + self.selected.get(namespace, [])
        for policy, group in selected:
            if policy.selector is not None and policy.selector <= labels:
                if policy.action == DENY:
                    deny.append(group)
                else:
                    allow.append(group)
                    allowing.append(policy)
        if allowing:
            names = ", ".join(_short(p.ref) for p in allowing[:3]) + (", ..." if len(allowing) > 3 else "")
            otherwise = Decision(False, None, None, f"no ALLOW policy matched ({names})")
        else:
            otherwise = ALLOWED_BY_DEFAULT
        plaintext, ports = self._plaintext(namespace, labels)
        scope = Scope(tuple(g for g in deny if g), tuple(g for g in allow if g), otherwise, plaintext, ports)
        if len(self.scopes) >= _SCOPES_MAX:
            self.scopes.clear()
        self.scopes[key] = scope
        return scope

    def _plaintext(self, namespace: str, labels: Labels) -> tuple[Decision | None, dict[int, Decision | None]]:
        """The verdict on connections without a peer identity: mesh, then namespace, then workload level,
        each overriding the one before unless UNSET; then the workload's port-level modes."""
        mode, source = PERMISSIVE, None
        levels = [self.mesh_mtls]
        if namespace != self.root:
            levels.append(self.namespace_mtls.get(namespace))
        workload = next((pa for pa in self.workload_mtls.get(namespace, ())
                         if pa.selector is not None and pa.selector <= labels), None)
        levels.append(workload)
        for pa in levels:
            if pa is not None and pa.mode != UNSET:
                mode, source = pa.mode, pa
        default = _plaintext_decision(mode, source, None)
        if workload is None:
            return default, {}
        ports = {port: (_plaintext_decision(port_mode, workload, port) if port_mode != UNSET else default)
                 for port, port_mode in workload.ports.items()}
        return default, ports


def _snapshot(objects: list[Mapping[str, Any]]) -> object:
    """A copy of ``objects`` to tell later whether they changed (the caller may change them in place): their
    pickle, several times cheaper than a deep copy. Equal objects pickle alike (at worst, objects sharing
    parts differently do not, and the set is read again); different ones never do. Objects nested too deep
    to pickle get a snapshot equal to nothing: they are read again each time."""
    try:
        return pickle.dumps(objects, pickle.HIGHEST_PROTOCOL)
    except RecursionError:
        return object()
    except (pickle.PicklingError, TypeError, AttributeError):  # mappings that do not pickle
        pass
    try:
        return pickle.dumps(_plain(objects), pickle.HIGHEST_PROTOCOL)
    except (RecursionError, pickle.PicklingError, TypeError, AttributeError):
        return object()


def _plain(value: Any) -> Any:
    """``value`` with every mapping and list copied as a dict and a list: a snapshot of anything else."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class PolicyEngine:
    """Istio's L4 AuthorizationPolicy and PeerAuthentication, as ztunnel enforces them; no I/O."""

    def __init__(self, root_namespace: str = "istio-system") -> None:
        self.root_namespace = root_namespace
        self._index = _Index(root_namespace, (), ())
        self._in_force: list[str] = []
        self._notes: list[str] = []
        self._errors: list[PolicyError] = []
        self._waypoint: tuple[AuthorizationPolicy, ...] = ()
        self._loaded: object = None  # a snapshot of the policy objects of the last update

    def update(self, objects: Iterable[Mapping[str, Any]]) -> list[PolicyError]:
        """Replace the whole set with the valid AuthorizationPolicy and PeerAuthentication objects among
        ``objects`` (other kinds are ignored). Returns the rejections, without logging them; notes on
        accepted objects (HTTP attributes, targetRefs, DISABLE, ...) are logged and kept in ``notes``.
        Given the same policy objects as last time (other objects may differ), it changes nothing and
        returns the same rejections: callers can pass every new cluster state."""
        relevant = [obj for obj in objects if isinstance(obj, Mapping) and obj.get("kind") in KINDS]
        snapshot = _snapshot(relevant)
        if snapshot == self._loaded:
            return list(self._errors)
        parsed = read_all(relevant)
        l4 = project(parsed.values)
        errors = parsed.errors + l4.errors
        policies, authentications, notes = l4.policies, l4.authentications, l4.notes
        index = _Index(self.root_namespace, policies, authentications)
        notes += index.notes
        for level, note in notes:
            log.log(level, "%s", note)
        self._index = index  # one assignment: evaluate() sees the old set or the new one, never a mix
        self._in_force = sorted([p.ref for p in policies] + [a.ref for a in authentications])
        self._notes = [note for _, note in notes]
        self._errors = errors
        self._waypoint = tuple(l4.waypoint)
        self._loaded = snapshot
        return list(errors)

    def evaluate(self, peer: Peer, target: Target) -> Decision:
        """The decision on one connection from ``peer`` to ``target``."""
        index = self._index
        labels = target.labels
        # fast path: the same labels object as before (callers keep one per workload), with the same content
        seen = index.by_labels.get(id(labels))
        if seen is not None and seen[0] is labels and seen[2] == target.namespace and seen[1] == labels:
            ports = seen[3]
        else:
            ports = index.remember(target.namespace, labels)
        decide = ports.get(target.port)
        if decide is None:
            decide = index.at(target.namespace, labels, target.port)
        return decide(peer, target)

    @property
    def policies(self) -> list[str]:
        """The objects in force ("AuthorizationPolicy ns/name", "PeerAuthentication ns/name"), sorted."""
        return list(self._in_force)

    @property
    def waypoint_policies(self) -> tuple[AuthorizationPolicy, ...]:
        """The accepted AuthorizationPolicies with targetRefs, whole: Istio applies them at waypoints and
        gateways, never here."""
        return self._waypoint

    @property
    def notes(self) -> list[str]:
        """What the last update logged about accepted objects (HTTP attributes, targetRefs, ...)."""
        return list(self._notes)
