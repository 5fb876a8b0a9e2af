"""The values the policy engine takes and gives: a connection's peer and target, a decision, a rejection."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Peer:
    """What the inbound side knows of a connection's source."""

    principal: str | None  # "cluster.local/ns/a/sa/b" from the verified mTLS identity, or None (plaintext)
    namespace: str | None  # the source namespace from that identity, or None
    ip: str  # source IP


@dataclass(frozen=True, slots=True)
class Target:
    """The destination workload of a connection, and the address and port it was made to."""

    namespace: str  # destination workload's namespace
    labels: Mapping[str, str]  # destination workload's labels
    ip: str
    port: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one connection and what reached it."""

    allowed: bool
    policy: str | None  # "AuthorizationPolicy ns/name" or "PeerAuthentication ns/name" that decided; None if default
    rule: int | None  # index (in spec.rules) of the rule that decided, if a rule decided
    reason: str  # human-readable


@dataclass(frozen=True, slots=True)
class PolicyError:
    """Why one object was rejected: the object ("Kind ns/name"), the field path in it, and the problem."""

    object: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.object}: {self.field}: {self.message}" if self.field else f"{self.object}: {self.message}"
