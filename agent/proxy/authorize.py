"""Inbound authorization: the policy engine, asked with what the inbound side knows of a connection.

Every way in (HBONE, plaintext, same node) decides here, at the destination's agent. The answer's
reason names the policy and rule that decided; it becomes the denial's log line and the flow's drop
reason.
"""

from __future__ import annotations

import logging

from agent.mesh.store import MeshState, MeshStore
from agent.policy import Peer, PolicyEngine, Target
from agent.proxy.context import Denial
from agent.proxy.inputs import Connection

log = logging.getLogger(__name__)


class Authorizer:
    def __init__(self, store: MeshStore, root_namespace: str = "istio-system") -> None:
        self.store = store
        self.engine = PolicyEngine(root_namespace)
        self.update(store.state)

    def update(self, state: MeshState) -> None:
        """Take the policies of a new state; invalid ones are reported and left out, the rest apply."""
        for error in self.engine.update(state.objects):
            log.error("policy rejected: %s", error)

    def __call__(self, connection: Connection) -> Denial | None:
        ip, port = connection.target
        workload = self.store.state.by_ip(ip)
        if workload is None:
            return Denial(f"no workload at {ip}")
        peer = connection.peer
        decision = self.engine.evaluate(
            Peer(principal=str(peer).removeprefix("spiffe://") if peer else None,
                 namespace=peer.namespace if peer else None, ip=connection.client[0]),
            Target(workload.namespace, workload.labels, ip, port))
        return None if decision.allowed else Denial(decision.reason, decision.policy)
