"""What a rule tests, as data: string patterns, IP blocks, ports, and how tests combine into a rule.

Strings follow Istio's four forms: exact ``abc``, prefix ``abc*`` (matches ``abc`` too), suffix ``*abc`` and
presence ``*`` (any non-empty value). A plaintext peer has no principal and no namespace: it matches no
positive string pattern (not even ``*``) and every ``not*`` one, as in ztunnel. IP blocks are compared as
integers, each against the addresses of its own family. A connection's IPv4-mapped IPv6 address counts as its
IPv4 address (ztunnel's ``to_canonical``), while a block written IPv4-mapped (``::ffff:10.0.0.0/104``) stays an
IPv6 block, as ztunnel keeps it, and so matches no connection (the policy reader notes it).

A rule's condition is a conjunction of clauses, a clause a disjunction of alternatives, an alternative a
conjunction of checks: ``from`` is one clause whose alternatives are its sources, ``to`` one whose
alternatives are its operations, and each ``when`` entry a clause of one alternative. An empty
alternative places no condition, so a clause holding one always passes and is left out, and a condition
with no clauses always passes. ``compiler`` turns conditions into code; ``holds`` is the plain reading.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from agent.policy.model import Peer, Target

# -- strings --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringSet:
    """Istio string patterns, split by form."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    presence: bool

    @classmethod
    def of(cls, patterns: Iterable[str]) -> StringSet:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        presence = False
        for p in patterns:
            if p == "*":
                presence = True
            elif p.startswith("*"):
                suffixes.append(p[1:])
            elif p.endswith("*"):
                prefixes.append(p[:-1])
            else:
                exact.add(p)
        return cls(frozenset(exact), tuple(dict.fromkeys(prefixes)), tuple(dict.fromkeys(suffixes)), presence)

    def matches(self, value: str | None) -> bool:
        if not value:
            return False
        return self.presence or value in self.exact or value.startswith(self.prefixes) or value.endswith(self.suffixes)


# -- IP addresses ---------------------------------------------------------------------------------------

Address = tuple[int, int]  # (IP version, integer value)


def address(text: str) -> Address | None:
    """``text`` as (version, integer), IPv4-mapped IPv6 folded to IPv4; None if it is not an IP address."""
    try:
        return (4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
    except OSError:
        pass
    try:
        number = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.partition("%")[0]), "big")
    except OSError:
        return None
    return (4, number & 0xFFFFFFFF) if number >> 32 == 0xFFFF else (6, number)


def parse_block(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR block or single IP, host bits allowed (``10.1.2.3/8`` is ``10.0.0.0/8``); ValueError if neither."""
    if "/" in text:
        return ipaddress.ip_network(text, strict=False)
    return ipaddress.ip_network(ipaddress.ip_address(text))


def ipv4_mapped(block: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """Whether ``block`` lies in ``::ffff:0:0/96``, the IPv4-mapped IPv6 addresses (no connection is spelled so)."""
    return block.version == 6 and block.prefixlen >= 96 and int(block.network_address) >> 32 == 0xFFFF


@dataclass(frozen=True, slots=True)
class IpSet:
    """IP blocks: single addresses in a set, wider blocks as (version, network, mask) triples."""

    hosts: frozenset[Address]
    networks: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, blocks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> IpSet:
        hosts: set[Address] = set()
        networks: list[tuple[int, int, int]] = []
        for block in blocks:
            if block.prefixlen == block.max_prefixlen:
                hosts.add((block.version, int(block.network_address)))
            else:
                networks.append((block.version, int(block.network_address), int(block.netmask)))
        return cls(frozenset(hosts), tuple(dict.fromkeys(networks)))

    def contains(self, text: str) -> bool:
        found = address(text)
        if found is None:
            return False
        if found in self.hosts:
            return True
        version, value = found
        for v, network, mask in self.networks:  # noqa: SIM110 - a plain loop: any() over a generator costs more
            if v == version and value & mask == network:
                return True
        return False


# -- checks and conditions -------------------------------------------------------------------------------

Attribute = Literal["principal", "namespace", "service_account", "source_ip", "destination_ip", "port"]


@dataclass(frozen=True, slots=True)
class Check:
    """One attribute of the connection against one set of values, or (negated) against none of them.
    ``service_account`` values are principal tails ``/ns/NS/sa/SA``; ports are integers."""

    attribute: Attribute
    values: StringSet | IpSet | frozenset[str] | frozenset[int]
    negate: bool = False


Alternative = tuple[Check, ...]  # every check passes
Clause = tuple[Alternative, ...]  # one alternative passes
Condition = tuple[Clause, ...]  # every clause passes


def clause(alternatives: Iterable[Alternative]) -> Clause | None:
    """A clause of ``alternatives``; None when one of them places no condition (the clause always passes)."""
    out = tuple(alternatives)
    return None if any(not a for a in out) else out


def service_account_of(principal: str | None) -> str | None:
    """The ``/ns/NS/sa/SA`` tail of ``td/ns/NS/sa/SA`` (whatever the trust domain), as service accounts match."""
    if not principal or "/" not in principal:
        return None
    return principal[principal.find("/"):]


def passes(test: Check, peer: Peer, target: Target) -> bool:
    """The plain reading of one check (the compiler generates the same logic inline)."""
    values = test.values
    if test.attribute == "port":
        found = target.port in values  # type: ignore[operator]
    elif test.attribute in ("source_ip", "destination_ip"):
        assert isinstance(values, IpSet)
        found = values.contains(peer.ip if test.attribute == "source_ip" else target.ip)
    elif test.attribute == "service_account":
        found = service_account_of(peer.principal) in values  # type: ignore[operator]
    else:
        assert isinstance(values, StringSet)
        found = values.matches(peer.principal if test.attribute == "principal" else peer.namespace)
    return found != test.negate


def holds(condition: Condition, peer: Peer, target: Target) -> bool:
    """The plain reading of a condition: every clause has an alternative whose tests all pass."""
    return all(any(all(passes(t, peer, target) for t in alt) for alt in c) for c in condition)
