"""What the agent's proxies share: who is where (the store), identities, the tunnel pool, policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.ca.manager import CertificateManager
from agent.proxy.connections import ConnectionTable
from agent.state import Workload, WorkloadStore
from hbone.pool import Pool
from hbone.server import InboundRequest

HBONE_PORT = 15008

Policy = Callable[[InboundRequest], str | None]  # None allows; a string denies and says why


def allow_all(_request: InboundRequest) -> str | None:
    return None


@dataclass
class Mesh:
    node: str
    trust_domain: str
    store: WorkloadStore
    certificates: CertificateManager
    pool: Pool
    local_addresses: frozenset[str]  # the node's own addresses: never spoofed towards
    policy: Policy = allow_all
    connections: ConnectionTable = field(default_factory=ConnectionTable)

    def local_enrolled(self, ip: str) -> Workload | None:
        """The enrolled workload of this node at ``ip``, if there is one."""
        workload = self.store.state.by_ip(ip)
        return workload if workload is not None and workload.enrolled and workload.node == self.node else None
