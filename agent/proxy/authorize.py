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
from hbone.server import InboundRequest

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

    def __call__(self, request: InboundRequest) -> Denial | None:
        workload = self.store.state.by_ip(request.target.ip)
        if workload is None:
            return Denial(f"no workload at {request.target.ip}")
        peer = request.peer
        decision = self.engine.evaluate(
            Peer(principal=str(peer).removeprefix("spiffe://") if peer else None,
                 namespace=peer.namespace if peer else None, ip=request.source[0]),
            Target(workload.namespace, workload.labels, request.target.ip, request.target.port))
        return None if decision.allowed else Denial(decision.reason, decision.policy)
