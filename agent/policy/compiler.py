"""Rules to Python functions: what decides the connections to one port of a set of workloads, as straight-line
code.

``compile_rules(rules, ...)`` turns rules (conditions with their decisions, in order) into one function
``decide(peer, target)`` returning the decision of the first rule whose condition holds. The engine
compiles one such function for each destination port of each set of workloads (see ``engine``), from
``RuleGroup``s: rules that always apply together, specialized per port (``specialize`` decides the checks
on the port at compile time, so a rule that cannot apply to that port is not in the function at all, and
one that always does has its port check gone). The generated code reads each connection attribute once
and runs one ``if`` per rule with the checks inline (set membership, ``str.startswith`` with a tuple of
prefixes, integer masks for IP blocks), cheapest first: a function call per check, or a check per rule
that cannot match, would cost several times as much, and every connection is decided this way.

Safety: the source is made only of fixed fragments, integers and generated names (``_c0``, ``_c1``, ...)
bound to the precompiled values in the function's namespace; no text from a policy ever becomes code.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Sequence
from types import CodeType
from typing import Any

from agent.policy.matchers import Check, Condition, IpSet, StringSet, address
from agent.policy.model import Decision, Peer, Target

Group = Callable[[Peer, Target], Decision | None]

_INVALID = (0, -1)  # an address that is neither IPv4 nor IPv6: it is in no block

# how each local the generated code uses is read; an address becomes its version and integer value, IPv4
# parsed inline (the common case, and a function call would double its cost), anything else by ``address``
_LOCALS = {
    "principal": ["principal = peer.principal"],
    "namespace": ["namespace = peer.namespace"],
    "ip": ["try:", "    sv, si = 4, _from_bytes(_pton(_AF_INET, peer.ip), 'big')",
           "except _OSError:", "    sv, si = _address(peer.ip) or _INVALID"],
    "dip": ["try:", "    dv, di = 4, _from_bytes(_pton(_AF_INET, target.ip), 'big')",
            "except _OSError:", "    dv, di = _address(target.ip) or _INVALID"],
}
# cheapest first: set lookups on strings, string methods, integer masks
_COST = {"port": 0, "namespace": 1, "principal": 1, "service_account": 2, "source_ip": 3, "destination_ip": 3}


def no_rules(_peer: Peer, _target: Target) -> Decision | None:
    """The function of a group with no rule that can match."""
    return None


def specialize(condition: Condition, port: int | None) -> Condition | None:
    """``condition`` with its checks on the port decided for ``port`` (None: a port none of them names);
    None if it cannot hold for that port."""
    clauses = []
    for clause in condition:
        alternatives = []
        for alternative in clause:
            checks = []
            for check in alternative:
                if check.attribute != "port":
                    checks.append(check)
                elif (port in check.values) == check.negate:  # type: ignore[operator]
                    break  # this check fails, and with it the alternative
            else:
                if not checks:
                    break  # this alternative places no other condition: the clause holds
                alternatives.append(tuple(checks))
        else:
            if not alternatives:
                return None
            clauses.append(tuple(alternatives))
    return tuple(clauses)


class _Emitter:
    def __init__(self) -> None:
        self.constants: dict[str, Any] = {"_address": address, "_INVALID": _INVALID, "_from_bytes": int.from_bytes,
                                          "_pton": socket.inet_pton, "_AF_INET": socket.AF_INET, "_OSError": OSError}
        self.used: set[str] = set()

    def constant(self, value: Any) -> str:
        name = f"_c{len(self.constants)}"
        self.constants[name] = value
        return name

    def string(self, var: str, patterns: StringSet) -> str:
        self.used.add(var)
        if patterns.presence:
            return var  # truthy: set and not empty
        parts = []
        if patterns.exact:
            parts.append(f"{var} in {self.constant(patterns.exact)}")
        if patterns.prefixes:
            parts.append(f"{var}.startswith({self.constant(patterns.prefixes)})")
        if patterns.suffixes:
            parts.append(f"{var}.endswith({self.constant(patterns.suffixes)})")
        if not parts:
            return "False"
        if len(parts) == 1 and patterns.exact:
            return parts[0]  # None is in no set of strings: no guard needed
        return f"({var} is not None and ({' or '.join(parts)}))"

    def blocks(self, var: str, blocks: IpSet) -> str:
        """Membership in ``blocks`` of the address read into ``var`` (its version and value: see _LOCALS)."""
        self.used.add(var)
        version, value = ("sv", "si") if var == "ip" else ("dv", "di")
        per_version = []
        for ip_version in (4, 6):
            parts = []
            hosts = frozenset(v for ver, v in blocks.hosts if ver == ip_version)
            if hosts:
                parts.append(f"{value} in {self.constant(hosts)}")
            parts += [f"{value} & {int(mask)} == {int(network)}"
                      for ver, network, mask in blocks.networks if ver == ip_version]
            if parts:
                per_version.append(f"{version} == {ip_version} and ({' or '.join(parts)})")
        if not per_version:
            return "False"
        return per_version[0] if len(per_version) == 1 else "(" + " or ".join(f"({p})" for p in per_version) + ")"

    def check(self, check: Check) -> str:
        values = check.values
        if check.attribute == "port":  # only in unspecialized conditions
            return f"target.port {'not in' if check.negate else 'in'} {self.constant(values)}"
        if check.attribute in ("principal", "namespace"):
            assert isinstance(values, StringSet)
            positive = self.string(check.attribute, values)
        elif check.attribute == "service_account":
            self.used.add("principal")
            positive = f"(principal is not None and principal[principal.find('/'):] in {self.constant(values)})"
        else:
            assert isinstance(values, IpSet)
            positive = self.blocks("ip" if check.attribute == "source_ip" else "dip", values)
        return f"not ({positive})" if check.negate else positive

    def condition(self, condition: Condition) -> str:
        """A Python expression for ``condition``; ``True`` if it places none."""
        clauses = []
        for clause in sorted(condition, key=lambda c: max((_COST[t.attribute] for alt in c for t in alt), default=0)):
            alternatives = [" and ".join(self.check(t) for t in sorted(alt, key=lambda t: _COST[t.attribute]))
                            or "True" for alt in clause]  # no checks: no condition
            if not alternatives:
                clauses.append("False")  # no alternative can hold
            elif len(alternatives) == 1:
                clauses.append(alternatives[0])
            else:
                clauses.append("(" + " or ".join(f"({a})" for a in alternatives) + ")")
        return " and ".join(clauses) if clauses else "True"


def compile_rules(rules: Sequence[tuple[Condition, Decision]], name: str = "rules", *,
                  plaintext: Decision | None = None, otherwise: Decision | None = None) -> Group:
    """One function deciding ``rules`` in order: the first rule whose condition holds gives its decision,
    else ``otherwise``. With ``plaintext``, a connection without a peer identity gets that decision first."""
    if not rules and plaintext is None:
        return no_rules if otherwise is None else _constant(otherwise)
    emit = _Emitter()
    body = []
    for condition, decision in rules:
        expression = emit.condition(condition)
        result = emit.constant(decision)
        if expression == "True":
            body.append(f"    return {result}")
            break  # the rules after this one cannot be reached
        body += [f"    if {expression}:", f"        return {result}"]
    else:
        body.append(f"    return {emit.constant(otherwise) if otherwise is not None else 'None'}")
    loads = []
    if plaintext is not None:  # read the principal first, to decide plaintext before reading anything else
        emit.used.add("principal")
    for var, lines in _LOCALS.items():
        if var in emit.used:
            loads += [f"    {line}" for line in lines]
        if var == "principal" and plaintext is not None:
            loads += ["    if principal is None:", f"        return {emit.constant(plaintext)}"]
    source = "\n".join(["def decide(peer, target):", *loads, *body, ""])
    scope: dict[str, Any] = {"__builtins__": {}, **emit.constants}
    exec(_code(source), scope)
    decide: Group = scope["decide"]
    decide.__qualname__ = f"decide[{name}]"
    decide.__doc__ = source  # to see what runs: print(function.__doc__)
    return decide


@functools.lru_cache(maxsize=4096)
def _code(source: str) -> CodeType:
    """Compiled ``source``: rules of the same shape give the same source (constants are bound by name), and
    compiling costs a hundred times more than binding."""
    return compile(source, "<ambit policy>", "exec")


def _constant(decision: Decision) -> Group:
    def decide(_peer: Peer, _target: Target) -> Decision:
        return decision

    return decide


class RuleGroup:
    """Rules that always apply together, in order, with their specializations per destination port."""

    def __init__(self, rules: Sequence[tuple[Condition, Decision]], name: str) -> None:
        self.rules = tuple(rules)
        self.name = name
        self.ports = frozenset(p for condition, _ in self.rules for clause in condition for alt in clause
                               for check in alt if check.attribute == "port"
                               for p in check.values)  # type: ignore[union-attr]
        self._specialized: dict[int | None, tuple[tuple[Condition, Decision], ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def port_key(self, port: int) -> int | None:
        """``port``, or None for every port no rule names (they are all decided alike)."""
        return port if port in self.ports else None

    def rules_for(self, port: int) -> tuple[tuple[Condition, Decision], ...]:
        """The rules that can apply to connections to ``port``, their port checks decided."""
        key = self.port_key(port)
        rules = self._specialized.get(key)
        if rules is None:
            narrowed = ((specialize(condition, key), decision) for condition, decision in self.rules)
            rules = self._specialized[key] = tuple((c, d) for c, d in narrowed if c is not None)
        return rules
