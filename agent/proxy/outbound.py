"""Outbound: every TCP connection an enrolled pod of this node opens, captured to 15001.

The accepted socket's local address is where the pod meant to go. Then:
  * an enrolled workload on another node: an HBONE stream to ``<its ip>:15008``, presenting the source
    pod's certificate, expecting the destination's identity, dialled from the pod's own address;
  * an enrolled workload on this node: handed to the inbound side (policy, then a local connection);
  * anything else (outside the mesh): passed through unchanged, from the pod's address.
No transport exists until the route is ready, so what the pod sends waits in the kernel meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from agent.identity.manager import CertificateUnavailable
from agent.mesh.model import Address
from agent.mesh.store import Workload
from agent.proxy.context import HBONE_PORT, Mesh
from agent.proxy.inbound import UPSTREAM_CONNECT_TIMEOUT, InboundProxy
from agent.proxy.sockets import addresses, close_with_reset, dial
from agent.proxy.splice import Splice
from hbone.accept import Acceptor
from hbone.client import HboneError, StreamFailed, request_headers
from hbone.protocol import Authority
from hbone.relay import Relay

log = logging.getLogger(__name__)



class OutboundProxy:
    def __init__(self, mesh: Mesh, inbound: InboundProxy) -> None:
        self.mesh, self.inbound = mesh, inbound
        self._acceptor: Acceptor | None = None

    def start(self, listener: socket.socket) -> None:
        self._acceptor = Acceptor(listener, self._handle, "outbound")
        self._acceptor.start()

    async def stop_accepting(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.stop()

    async def close(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.close()

    async def _handle(self, sock: socket.socket) -> None:
        ends = addresses(sock)
        if ends is None:
            return
        client, target = ends
        mesh = self.mesh
        source = mesh.local_enrolled(client[0])
        if source is None:  # captured, yet not an enrolled pod of ours: fail closed
            log.warning("outbound %s -> %s: source is not an enrolled pod of node %s; refused",
                        client, target, mesh.node)
            close_with_reset(sock)
            return
        destination = mesh.store.state.by_ip(target[0])
        if destination is not None and destination.enrolled:
            if destination.node == mesh.node:
                await self.inbound.deliver(sock, source.identity(mesh.trust_domain), client, target, target)
            else:
                await self._tunnel(sock, source, destination, client, target)
        else:
            await self._passthrough(sock, client, target)

    async def _tunnel(self, sock: socket.socket, source: Workload, destination: Workload, client: Address,
                      target: Address) -> None:
        td = self.mesh.trust_domain
        relay = Relay()
        try:
            cert = await self.mesh.certificates.get(source.identity(td))
            await self.mesh.pool.connect(relay, cert, destination.identity(td), (destination.ip, HBONE_PORT),
                                         Authority(*target), request_headers(client), source_ip=client[0])
        except (HboneError, CertificateUnavailable, OSError) as e:
            log.warning("outbound %s (%s) -> %s (%s): %s", client, source.key, target, destination.key, e)
            reason = f"tunnel failed: {e}"
            if isinstance(e, StreamFailed) and e.status == 401:
                reason = "denied by the destination (CONNECT answered 401)"
            self.mesh.telemetry.dropped(inbound=False, client=client, target=target, mtls=True, reason=reason)
            close_with_reset(sock)
            return
        await asyncio.get_running_loop().connect_accepted_socket(lambda: relay, sock)
        flow = self.mesh.telemetry.opened(inbound=False, client=client, target=target, mtls=True)
        self.mesh.track("outbound-hbone", (client[0],), relay, flow)

    async def _passthrough(self, sock: socket.socket, client: Address, target: Address) -> None:
        source_ip = None if target[0] in self.mesh.local_addresses else client[0]
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
                upstream = await dial(target, source_ip)
        except (OSError, TimeoutError) as e:
            log.info("passthrough %s -> %s failed: %s", client, target, e or "timed out")
            self.mesh.telemetry.dropped(inbound=False, client=client, target=target, mtls=False,
                                       reason=f"upstream unreachable: {e or 'timed out'}")
            close_with_reset(sock)
            return
        splice = Splice()
        await splice.join(sock, upstream)
        flow = self.mesh.telemetry.opened(inbound=False, client=client, target=target, mtls=False)
        self.mesh.track("passthrough", (client[0],), splice, flow)
