"""Inbound authorization: the policy engine, asked with what the inbound side knows of a connection.

Every way in (HBONE, plaintext, same node) decides here, at the destination's agent. The answer's
reason names the policy and rule that decided; it becomes the denial's log line and the flow's drop
reason.
"""

from __future__ import annotations

import logging

from agent.mesh.memo import StateMemo
from agent.mesh.model import Address
from agent.mesh.store import MeshState, MeshStore
from agent.policy import Peer, PolicyEngine, Target
from agent.proxy.context import Denial
from agent.proxy.inputs import Connection
from hbone import SpiffeId

log = logging.getLogger(__name__)

PEERS_MAX = 4096  # (identity, ip) pairs whose Peer is kept; past it they start over


class Authorizer:
    def __init__(self, store: MeshStore, root_namespace: str = "istio-system") -> None:
        self.store = store
        self.engine = PolicyEngine(root_namespace)
        # the engine's inputs as the same few peers and pods make them again and again (None: no workload)
        self._peers: dict[tuple[SpiffeId | None, str], Peer] = {}
        self._targets: StateMemo[Address, Target | None] = StateMemo(store)
        # The answer for (peer, client IP, target): a connection's port on the client side is no input of L4 policy.
        self._answers: StateMemo[tuple[SpiffeId | None, str, Address], Denial | None] = StateMemo(store)
        self.update(store.state)

    def update(self, state: MeshState) -> None:
        """Take the policies of a new state; invalid ones are reported and left out, the rest apply."""
        for error in self.engine.update(state.objects):
            log.error("policy rejected: %s", error)
        self._answers = StateMemo(self.store)  # (called as the store publishes a state, or with new policies)

    def __call__(self, connection: Connection) -> Denial | None:
        answers = self._answers.current()
        key = (connection.peer, connection.client[0], connection.target)
        try:
            return answers[key]
        except KeyError:
            answer = answers[key] = self._decide(connection)
            return answer

    def _decide(self, connection: Connection) -> Denial | None:
        targets = self._targets.current()
        target = targets.get(connection.target)
        if target is None:
            ip, port = connection.target
            workload = self.store.state.by_ip(ip)
            if workload is None:
                return Denial(f"no workload at {ip}")
            target = targets[connection.target] = Target(workload.namespace, workload.labels, ip, port)
        key = (connection.peer, connection.client[0])
        peer = self._peers.get(key)
        if peer is None:
            if len(self._peers) >= PEERS_MAX:
                self._peers.clear()
            identity = connection.peer
            peer = self._peers[key] = Peer(principal=str(identity).removeprefix("spiffe://") if identity else None,
                                           namespace=identity.namespace if identity else None, ip=key[1])
        decision = self.engine.evaluate(peer, target)
        return None if decision.allowed else Denial(decision.reason, decision.policy)
