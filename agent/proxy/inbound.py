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

from agent.mesh.memo import StateMemo
from agent.mesh.model import Address
from agent.proxy.connections import Proxied
from agent.proxy.context import Mesh
from agent.proxy.inputs import Connection, forwarded_client, forwarded_host
from agent.proxy.sockets import dial, upstream_source
from agent.proxy.splice import Splice
from agent.telemetry.recorder import FlowHandle
from hbone import (
    Acceptor,
    HboneServer,
    InboundRequest,
    Relay,
    SpiffeId,
    StreamHandler,
    WorkloadCertificate,
    accepted_addresses,
    close_with_reset,
)

log = logging.getLogger(__name__)

UPSTREAM_CONNECT_TIMEOUT = 10.0


class InboundProxy:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.hbone = HboneServer(self._certificate, lambda: mesh.certificates.trust_bundle,
                                 policy=self._decide, connect=self._connect, established=self._established)
        self._plaintext: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once (a getpid(2) per lookup in 3.11)
        self._services: StateMemo[Address, str] = StateMemo(mesh.store)  # target -> _service's guess ("": none)
        self._last: tuple[InboundRequest, Connection] | None = None

    async def start(self, hbone_listener: socket.socket, plaintext_listener: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        await self.hbone.start(sock=hbone_listener)
        self._plaintext = Acceptor(plaintext_listener, self._plain, "inbound plaintext")
        self._plaintext.start()

    async def stop_accepting(self) -> None:
        await self.hbone.stop_accepting()
        if self._plaintext is not None:
            await self._plaintext.stop()

    async def close(self) -> None:
        await self.hbone.close()
        if self._plaintext is not None:
            await self._plaintext.close()

    def _service(self, connection: Connection) -> str | None:
        """The Service hostname for the destination's telemetry: the one the source named, else the local pod's
        Service serving the target port (ztunnel's guess)."""
        if connection.service is not None:
            return connection.service
        guesses = self._services.current()
        hostname = guesses.get(connection.target)
        if hostname is None:
            service = self.mesh.store.state.service_serving(*connection.target)
            hostname = guesses[connection.target] = service.hostname if service is not None else ""
        return hostname or None

    def _connection(self, request: InboundRequest) -> Connection:
        """What a CONNECT says of its connection. The policy hook and then the connector ask about the same
        request: the last answer is kept for the second."""
        last = self._last
        if last is not None and last[0] is request:
            return last[1]
        connection = Connection(request.peer, forwarded_client(request.headers, request.source),
                                (request.target.ip, request.target.port), forwarded_host(request.headers))
        self._last = (request, connection)
        return connection

    def _decide(self, request: InboundRequest) -> str | None:
        connection = self._connection(request)
        denial = self.mesh.policy(connection)
        if denial is None:
            return None
        self.mesh.telemetry.dropped(inbound=True, client=connection.client, target=connection.target, mtls=True,
                                    reason=denial.reason, policy=denial.policy, service=self._service(connection))
        return denial.reason

    async def _certificate(self, ip: str) -> WorkloadCertificate | None:
        workload = self.mesh.local_enrolled(ip)
        if workload is None:
            log.warning("HBONE for %s: no enrolled workload of node %s has that address", ip, self.mesh.node)
            return None
        return await self.mesh.certificates.get(workload.identity(self.mesh.trust_domain))

    async def _connect(self, request: InboundRequest) -> Relay:
        sock = await dial((request.target.ip, request.target.port), request.source[0])
        _, relay = await (self._loop or asyncio.get_running_loop()).connect_accepted_socket(Relay, sock)
        return relay

    def _established(self, request: InboundRequest, handler: StreamHandler) -> None:
        """The HBONE server's word that a stream's 200 is written and its relay runs: the flow starts now, off the
        path to the answer."""
        assert isinstance(handler, Relay)  # (what ``_connect`` makes)
        self._opened(request, handler)

    def _opened(self, request: InboundRequest, relay: Proxied) -> None:
        """``relay`` carries the CONNECT's stream now: its flow starts, and it is tracked until it closes."""
        connection = self._connection(request)
        flow = self.mesh.telemetry.opened(inbound=True, client=connection.client, target=connection.target,
                                          mtls=True, service=self._service(connection))
        self.mesh.connections.watch("inbound-hbone", (request.target.ip,), relay, (flow,), server_side=True)

    async def _plain(self, sock: socket.socket) -> None:
        ends = accepted_addresses(sock)
        if ends is None:
            return
        client, target = ends
        if self.mesh.local_enrolled(target[0]) is None:
            log.warning("plaintext %s -> %s: not an enrolled pod of this node; refused", client, target)
            close_with_reset(sock)
            return
        await self.deliver(sock, None, client, target, self._called(client, target))

    def _called(self, client: Address, target: Address) -> str | None:
        """The Service a plaintext client called when this node DNATed it to ``target`` (kube-proxy's ClusterIP
        or node port, seen by the pod's door after the NAT): its hostname, or None (not NATed here; then telemetry
        falls back to ``_service``'s guess). Policy still sees ``target``, as in Istio."""
        try:
            original = self.mesh.original_destination(target, client)
        except (OSError, TimeoutError) as e:
            log.warning("plaintext %s -> %s: conntrack lookup failed: %s", client, target, e)
            return None
        if original is None:
            return None
        service = self.mesh.store.state.service_called(original, target[0])
        return service.hostname if service is not None else None

    async def deliver(self, sock: socket.socket, peer: SpiffeId | None, client: Address, target: Address,
                      service: str | None = None) -> None:
        """Policy, then a TCP connection from ``client`` to the pod at ``target``, spliced to ``sock``.
        ``service``: the hostname of the Service the client called (same node), when it called one."""
        connection = Connection(peer, client, target, service)
        service = self._service(connection)
        telemetry, mtls = self.mesh.telemetry, peer is not None
        denial = self.mesh.policy(connection)
        if denial is not None:
            log.info("%s %s -> %s denied: %s", "plaintext" if peer is None else peer, client, target, denial.reason)
            telemetry.dropped(inbound=True, client=client, target=target, mtls=mtls, reason=denial.reason,
                              policy=denial.policy, service=service)
            close_with_reset(sock)
            return
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
                upstream = await dial(target, upstream_source(client, target))
        except (OSError, TimeoutError) as e:
            log.info("%s -> %s: pod unreachable: %s", client, target, e or "timed out")
            telemetry.dropped(inbound=True, client=client, target=target, mtls=mtls,
                              reason=f"pod unreachable: {e or 'timed out'}", service=service)
            close_with_reset(sock)
            return
        splice = Splice()
        await splice.join(sock, upstream)
        pods = tuple(ip for ip in (client[0], target[0]) if self.mesh.local_enrolled(ip) is not None)
        flows: tuple[FlowHandle | None, ...] = (
            telemetry.opened(inbound=True, client=client, target=target, mtls=mtls, service=service),)
        if peer is not None:  # same node: this agent is the source's reporter as well
            flows += (telemetry.opened(inbound=False, client=client, target=target, mtls=mtls, service=service),)
        self.mesh.connections.watch("outbound-local" if peer is not None else "inbound-plaintext", pods, splice,
                                    flows)
