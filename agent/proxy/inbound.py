"""Inbound: traffic arriving for this node's enrolled pods.

Three ways in, one policy decision each:
  * HBONE (15008): mutual TLS, the client's SPIFFE identity verified, then CONNECT to the pod.
  * plaintext (15006): TCP captured on its way to an enrolled pod; no identity (STRICT denies it).
  * same node: an enrolled pod calling another enrolled pod of this node skips TLS and the network, but
    not policy: the outbound proxy hands it here with the caller's identity, which this agent knows.
The upstream connection to the pod is made from the client's address, so the pod sees who called.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from agent.proxy.context import Mesh
from agent.proxy.sockets import addresses, close_with_reset, dial
from agent.proxy.splice import Splice
from hbone.accept import Acceptor
from hbone.identity import SpiffeId, WorkloadCertificate
from hbone.protocol import Authority
from hbone.relay import Relay
from hbone.server import HboneServer, InboundRequest

log = logging.getLogger(__name__)

Address = tuple[str, int]
UPSTREAM_CONNECT_TIMEOUT = 10.0


class InboundProxy:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.hbone = HboneServer(self._certificate, lambda: mesh.certificates.trust_bundle,
                                 policy=self._decide, connect=self._connect)
        self._plaintext: Acceptor | None = None

    async def start(self, hbone_listener: socket.socket, plaintext_listener: socket.socket) -> None:
        await self.hbone.start(sock=hbone_listener)
        self._plaintext = Acceptor(plaintext_listener, self._plain, "inbound plaintext")
        self._plaintext.start()

    async def close(self) -> None:
        await self.hbone.close()
        if self._plaintext is not None:
            await self._plaintext.close()

    def _decide(self, request: InboundRequest) -> str | None:
        return self.mesh.policy(request)

    async def _certificate(self, ip: str) -> WorkloadCertificate | None:
        workload = self.mesh.local_enrolled(ip)
        if workload is None:
            log.warning("HBONE for %s: no enrolled workload of node %s has that address", ip, self.mesh.node)
            return None
        return await self.mesh.certificates.get(workload.identity(self.mesh.trust_domain))

    async def _connect(self, request: InboundRequest, relay: Callable[[], Relay]) -> object:
        sock = await dial((request.target.ip, request.target.port), request.source[0])
        transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(relay, sock)
        self.mesh.connections.watch("inbound-hbone", (request.target.ip,), protocol)
        return transport

    async def _plain(self, sock: socket.socket) -> None:
        ends = addresses(sock)
        if ends is None:
            return
        client, target = ends
        if self.mesh.local_enrolled(target[0]) is None:
            log.warning("plaintext %s -> %s: not an enrolled pod of this node; refused", client, target)
            close_with_reset(sock)
            return
        await self.deliver(sock, None, client, target, target)

    async def deliver(self, sock: socket.socket, peer: SpiffeId | None, client: Address, target: Address,
                      via: Address) -> None:
        """Policy, then a TCP connection from ``client`` to the pod at ``target``, spliced to ``sock``."""
        request = InboundRequest(peer, client, via, Authority(*target), {})
        denial = self.mesh.policy(request)
        if denial is not None:
            log.info("%s %s -> %s denied: %s", "plaintext" if peer is None else peer, client, target, denial)
            close_with_reset(sock)
            return
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
                upstream = await dial(target, client[0])
        except (OSError, TimeoutError) as e:
            log.info("%s -> %s: pod unreachable: %s", client, target, e or "timed out")
            close_with_reset(sock)
            return
        splice = Splice()
        await splice.join(sock, upstream)
        pods = tuple(ip for ip in (client[0], target[0]) if self.mesh.local_enrolled(ip) is not None)
        self.mesh.connections.watch("inbound-plaintext" if peer is None else "outbound-local", pods, splice)
