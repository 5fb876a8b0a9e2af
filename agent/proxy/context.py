"""What the agent's proxies share: who is where (the store), identities, the tunnel pool, policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.identity.manager import CertificateManager
from agent.mesh.model import Address
from agent.mesh.store import MeshStore, Workload
from agent.proxy.connections import ConnectionTable
from agent.proxy.inputs import Connection
from agent.telemetry.hub import Telemetry
from hbone import Pool

HBONE_PORT = 15008

@dataclass(frozen=True, slots=True)
class Denial:
    reason: str  # names the policy and rule that decided
    policy: str | None = None  # "AuthorizationPolicy ns/name", "PeerAuthentication ns/name"


Policy = Callable[[Connection], Denial | None]  # None allows
# The destination a connection accepted as (local, peer) was opened to before a DNAT on this node (a Service VIP,
# a node port), or None when it was not NATed here.
OriginalDestination = Callable[[Address, Address], Address | None]


def allow_all(_connection: Connection) -> Denial | None:
    return None


def never_translated(_local: Address, _peer: Address) -> Address | None:
    return None


@dataclass
class Mesh:
    node: str
    trust_domain: str
    store: MeshStore
    certificates: CertificateManager
    pool: Pool
    local_addresses: frozenset[str]  # the node's own addresses: never spoofed towards
    telemetry: Telemetry
    policy: Policy = allow_all
    connections: ConnectionTable = field(default_factory=ConnectionTable)
    original_destination: OriginalDestination = never_translated

    def local_enrolled(self, ip: str) -> Workload | None:
        """The enrolled workload of this node at ``ip``, if there is one."""
        workload = self.store.state.by_ip(ip)
        return workload if workload is not None and workload.enrolled and workload.node == self.node else None
