"""Outbound: every TCP connection an enrolled pod of this node opens, captured to 15001.

The accepted socket's local address is where the pod meant to go; ``route`` (a pure function of the mesh
state) says what that means, and this module only carries it out: an HBONE stream presenting the source
pod's certificate and expecting the destination's identity, dialled from the pod's own address; the local
inbound path for an enrolled pod of this node; a plain connection (a Service endpoint outside the mesh, or
anything not the mesh's); or a reset when nothing can serve a Service port. No transport exists until the
route is ready, so what the pod sends waits in the kernel meanwhile; only what it sent before the accept
goes out at once behind the CONNECT (``Relay.preload_from``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import NamedTuple

from agent.identity.manager import CertificateUnavailable
from agent.mesh.memo import StateMemo
from agent.mesh.model import Address
from agent.mesh.store import Workload
from agent.proxy.connections import Proxied
from agent.proxy.context import Mesh
from agent.proxy.inbound import UPSTREAM_CONNECT_TIMEOUT, InboundProxy
from agent.proxy.route import Choice, Kind, Route, resolve, to_endpoint
from agent.proxy.sockets import dial
from agent.proxy.splice import Splice
from agent.telemetry.metrics import NO_HEALTHY_UPSTREAM
from hbone import (
    Acceptor,
    Authority,
    HboneError,
    Relay,
    SpiffeId,
    StreamFailed,
    accepted_addresses,
    close_with_reset,
    request_headers,
)

log = logging.getLogger(__name__)


class Plan(NamedTuple):
    """What the mesh state says of a connection from an enrolled pod of this node to a destination."""

    source: Workload
    identity: SpiffeId  # the source's
    route: Route
    authority: Authority | None  # HBONE: the CONNECT's target


class _Draw:
    """A Service's endpoints for one source pod: each connection draws one; the plan per endpoint is kept."""

    __slots__ = ("choice", "plans", "source")

    def __init__(self, source: Workload, choice: Choice) -> None:
        self.source, self.choice = source, choice
        self.plans: dict[str, Plan] = {}  # by endpoint IP


class OutboundProxy:
    def __init__(self, mesh: Mesh, inbound: InboundProxy) -> None:
        self.mesh, self.inbound = mesh, inbound
        self._acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once (a getpid(2) per lookup in 3.11)
        self._plans: StateMemo[tuple[str, Address], Plan | _Draw] = StateMemo(mesh.store)

    def start(self, listener: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self._acceptor = Acceptor(listener, self._handle, "outbound")
        self._acceptor.start()

    async def stop_accepting(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.stop()

    async def close(self) -> None:
        if self._acceptor is not None:
            await self._acceptor.close()

    async def _handle(self, sock: socket.socket) -> None:
        ends = accepted_addresses(sock)
        if ends is None:
            return
        client, target = ends
        plan = self._plan(client, target)
        if plan is None:
            close_with_reset(sock)
            return
        r, mesh = plan.route, self.mesh
        if r.kind is Kind.HBONE:
            await self._tunnel(sock, plan, client, target)
        elif r.kind is Kind.LOCAL:
            await self.inbound.deliver(sock, plan.identity, client, r.target, service=r.service_host)
        elif r.kind is Kind.REFUSE:
            log.info("outbound %s (%s) -> %s refused: %s", client, plan.source.key, target, r.reason)
            mesh.telemetry.dropped(inbound=False, client=client, target=target, mtls=False, reason=r.reason,
                                   service=r.service_host, response_flags=NO_HEALTHY_UPSTREAM)
            close_with_reset(sock)
        else:
            await self._plain(sock, client, r)

    def _plan(self, client: Address, target: Address) -> Plan | None:
        """The plan for a connection from ``client`` to ``target``; None (logged) when ``client`` is not an
        enrolled pod of this node: captured all the same, it is refused (fail closed). Plans are kept for the
        state they were made from; a Service's endpoint is drawn for each connection (its candidates and the
        plan for each endpoint are kept)."""
        mesh = self.mesh
        plans = self._plans.current()
        key = (client[0], target)
        known = plans.get(key)
        if known is None:
            source = mesh.local_enrolled(client[0])
            if source is None:
                log.warning("outbound %s -> %s: source is not an enrolled pod of node %s; refused",
                            client, target, mesh.node)
                return None
            resolved = resolve(source, target, mesh.store.state, mesh.trust_domain)
            known = plans[key] = (self._made(source, resolved) if isinstance(resolved, Route)
                                  else _Draw(source, resolved))
        if isinstance(known, Plan):
            return known
        endpoint = random.choice(known.choice.candidates)
        plan = known.plans.get(endpoint.ip)
        if plan is None:
            r = to_endpoint(known.source, known.choice, endpoint, mesh.store.state, mesh.trust_domain)
            plan = known.plans[endpoint.ip] = self._made(known.source, r)
        return plan

    def _made(self, source: Workload, r: Route) -> Plan:
        return Plan(source, source.identity(self.mesh.trust_domain), r,
                    Authority(*r.target) if r.kind is Kind.HBONE else None)

    def _opened(self, kind: str, conn: Proxied, client: Address, r: Route, mtls: bool) -> None:
        """``conn`` carries the connection now: its flow starts, and it is tracked until it closes."""
        flow = self.mesh.telemetry.opened(inbound=False, client=client, target=r.target, mtls=mtls,
                                          service=r.service_host)
        self.mesh.connections.watch(kind, (client[0],), conn, (flow,))

    async def _tunnel(self, sock: socket.socket, plan: Plan, client: Address, target: Address) -> None:
        r = plan.route
        assert r.dial is not None and r.identity is not None and r.workload is not None and plan.authority
        relay = Relay()
        relay.preload_from(sock)
        try:
            certificates = self.mesh.certificates
            cert = certificates.at_hand(plan.identity) or await certificates.get(plan.identity)
            await self.mesh.pool.connect(relay, cert, r.identity, r.dial, plan.authority,
                                         request_headers(client, r.service_host), source_ip=client[0])
        except (HboneError, CertificateUnavailable, OSError) as e:
            log.warning("outbound %s (%s) -> %s (%s): %s", client, plan.source.key, target, r.workload.key, e)
            reason = f"tunnel failed: {e}"
            if isinstance(e, StreamFailed) and e.status == 401:
                reason = "denied by the destination (CONNECT answered 401)"
            self.mesh.telemetry.dropped(inbound=False, client=client, target=r.target, mtls=True, reason=reason,
                                        service=r.service_host)
            close_with_reset(sock)
            return
        await (self._loop or asyncio.get_running_loop()).connect_accepted_socket(lambda: relay, sock)
        self._opened("outbound-hbone", relay, client, r, mtls=True)

    async def _plain(self, sock: socket.socket, client: Address, r: Route) -> None:
        """Plain TCP to ``r.dial`` from the pod's own address (the node's, towards the node itself)."""
        assert r.dial is not None
        source_ip = None if r.dial[0] in self.mesh.local_addresses else client[0]
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
                upstream = await dial(r.dial, source_ip)
        except (OSError, TimeoutError) as e:
            log.info("%s %s -> %s failed: %s", r.kind.value, client, r.dial, e or "timed out")
            self.mesh.telemetry.dropped(inbound=False, client=client, target=r.target, mtls=False,
                                        reason=f"upstream unreachable: {e or 'timed out'}", service=r.service_host)
            close_with_reset(sock)
            return
        splice = Splice()
        await splice.join(sock, upstream)
        self._opened(r.kind.value, splice, client, r, mtls=False)
