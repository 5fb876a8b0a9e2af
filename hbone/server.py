"""The HBONE server (port 15008): mutual TLS, then HTTP/2 CONNECT streams relayed to upstream TCP.

The certificate presented is chosen per connection from the connection's local (original destination)
address, as ztunnel does for the pods of its node, so TLS starts only after the TCP accept. Requests are
answered as ztunnel answers them: 400 for a bad method or authority or an authority IP that is not the
connection's destination, 401 when policy denies, 503 when the upstream cannot be reached, and 200 only
once the upstream TCP connection is up.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

from h2.errors import ErrorCodes

from hbone.accept import Acceptor
from hbone.addresses import Address
from hbone.authority import Authority
from hbone.deadline import Deadline
from hbone.events import ConnectionEnded, ConnectRequest, Data, Event, RequestRejected
from hbone.identity import (
    IdentityError,
    SpiffeId,
    TrustBundle,
    WorkloadCertificate,
    server_context,
    verify_peer,
)
from hbone.protocol import ServerConnection, Settings
from hbone.relay import Relay
from hbone.sockets import accepted_addresses, listener
from hbone.tunnel import StreamHandler, Tunnel

log = logging.getLogger(__name__)



@dataclass(slots=True)
class InboundRequest:
    """What policy and the upstream connector know of one CONNECT request (immutable by convention: one is made per
    stream, and a frozen dataclass costs twice as much to make)."""

    peer: SpiffeId | None  # None on the plaintext path
    source: Address  # L3 source of the connection that carried the request
    destination: Address  # L3 destination of that connection (pod ip, 15008)
    target: Authority  # where the client wants to go
    headers: Mapping[str, str]


PolicyHook = Callable[[InboundRequest], str | None]  # None allows; a string denies and says why
# What consumes an admitted stream: connects whatever the stream is for (an upstream TCP connection for
# a Relay) and returns its handler; OSError or TimeoutError mean the upstream cannot be had (503).
UpstreamConnector = Callable[[InboundRequest], Awaitable[StreamHandler]]
# Told of each admitted stream once its handler runs: after the 200 was written, or, for a stream gone while its
# upstream connected, just before that handler is reset. For what need not delay the answer.
EstablishedHook = Callable[[InboundRequest, StreamHandler], None]
CertificateLookup = Callable[[str], Awaitable[WorkloadCertificate | None]]  # local ip -> certificate


async def connect_plain(request: InboundRequest) -> StreamHandler:
    """Default upstream: a TCP connection from this host to the target, relayed."""
    loop = asyncio.get_running_loop()
    _, relay = await loop.create_connection(Relay, request.target.ip, request.target.port)
    return relay


def fixed_certificate(cert: WorkloadCertificate) -> CertificateLookup:
    async def lookup(_ip: str) -> WorkloadCertificate:
        return cert
    return lookup


class _Pending(StreamHandler):
    """Stands for an admitted stream while its upstream is connected.

    What the client sends meanwhile waits here unacknowledged (so the stream's window bounds it) and is
    handed, in order, to the real handler once it starts; a reset cancels the connect.
    """

    def __init__(self) -> None:
        super().__init__()
        self.connecting: asyncio.Future[None] | None = None
        self.timed_out = False  # the connect outlasted the server's connect_timeout (``HboneServer._connects_due``)
        self.connects: dict[_Pending, float] | None = None  # the server's connects under way, this one among them
        self._data: list[Data] = []
        self._ended = False

    def hand_over(self, handler: StreamHandler) -> None:
        """``handler`` takes the stream, is started, and gets what arrived before it."""
        assert self.tunnel is not None
        handler.bind(self.tunnel, self.stream_id)
        handler.start()
        for d in self._data:
            handler.on_data(d)
        self._data.clear()
        if self._ended:
            handler.on_end()

    @property
    def buffered(self) -> int:
        return sum(len(d.data) for d in self._data)

    def start(self) -> None:
        raise AssertionError("a pending stream is handed over, never started")

    def on_data(self, d: Data) -> None:
        self._data.append(d)

    def on_end(self) -> None:
        self._ended = True

    def on_reset(self, reason: str) -> None:
        self._data.clear()
        if self.connects is not None:  # (a connect cancelled before it began has no ``finally`` to do this)
            self.connects.pop(self, None)
        if self.connecting is not None:
            self.connecting.cancel()
        self.finish(reason)

    def on_window(self) -> None:
        pass  # nothing to send before the 200

    def on_tunnel_paused(self, paused: bool) -> None:
        pass


class ServerTunnel(Tunnel):
    """A server-side TLS connection; the peer's identity is checked before anything is read."""

    def __init__(self, server: HboneServer, source: Address, destination: Address) -> None:
        super().__init__()
        self.conn = self.server_conn = ServerConnection(server.settings)
        self.server = server
        self.source, self.destination = source, destination
        self.peer: SpiffeId | None = None
        self._deadline_for = ""  # the deadline that applies now: "headers", "idle" or none
        self._deadlines = {"headers": Deadline(self.loop, server.header_timeout, lambda: self._expired("headers")),
                           "idle": Deadline(self.loop, server.idle_timeout, lambda: self._expired("idle"))}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            self.peer = verify_peer(transport.get_extra_info("ssl_object"), self.server.bundle)
        except IdentityError as e:
            self.server.count("identity_rejected")
            log.warning("HBONE from %s: %s", self.source, e)
            cast(asyncio.Transport, transport).abort()
            return
        self.server.tunnels.add(self)
        super().connection_made(transport)
        self._rearm()

    def data_received(self, data: bytes | memoryview) -> None:
        super().data_received(data)
        self._rearm()

    def stream_closed(self, handler: StreamHandler) -> None:
        super().stream_closed(handler)
        self._rearm()

    def _rearm(self) -> None:
        """Keep the deadline that applies now: the peer owes the rest of its preface, of a header block or
        of a control frame (``header_timeout``), or the connection has no stream (``idle_timeout``)."""
        if self.conn.closed is not None or self.transport is None or self.transport.is_closing():
            want = ""
        elif self.conn.awaiting_headers:
            want = "headers"
        else:
            want = "" if self.streams else "idle"
        previous, self._deadline_for = self._deadline_for, want
        if want == previous:
            return
        if previous:
            self._deadlines[previous].stop()
        if want:
            self._deadlines[want].start()

    def _expired(self, what: str) -> None:
        self._deadline_for = ""
        self.server.count(f"{what}_timeout")
        if what == "headers":
            log.info("HBONE from %s (%s): headers not received within %ss; closing", self.source, self.peer,
                     self.server.header_timeout)
            self.close(ErrorCodes.ENHANCE_YOUR_CALM)
        else:
            log.info("HBONE from %s (%s): idle for %ss; closing", self.source, self.peer, self.server.idle_timeout)
            self.close()

    def handle_request_or_response(self, ev: Event) -> None:
        if isinstance(ev, ConnectRequest):
            self.server.handle_connect(self, ev)
        elif isinstance(ev, RequestRejected):
            self.server.count("rejected_request")
            log.info("HBONE stream %s from %s (%s): %s -> %d", ev.stream_id, self.source, self.peer, ev.reason,
                     ev.status)

    def connection_ended(self, ev: ConnectionEnded) -> None:
        if ev.error_code:
            self.server.count("protocol_error")
            log.warning("HBONE from %s (%s): connection ended: %s (error code %d)", self.source, self.peer,
                        ev.reason, ev.error_code)
        super().connection_ended(ev)

    def connection_lost(self, exc: Exception | None) -> None:
        for deadline in self._deadlines.values():
            deadline.cancel()
        super().connection_lost(exc)
        self.server.tunnels.discard(self)


class HboneServer:
    def __init__(self, certificates: CertificateLookup, bundle: TrustBundle | Callable[[], TrustBundle], *,
                 policy: PolicyHook | None = None, connect: UpstreamConnector = connect_plain,
                 established: EstablishedHook | None = None, settings: Settings = Settings(),
                 handshake_timeout: float = 10.0, connect_timeout: float = 10.0, header_timeout: float = 10.0,
                 idle_timeout: float = 600.0, check_authority_ip: bool = True) -> None:
        """``header_timeout``: the most a client may take over its preface, a header block or a control
        frame once begun (nginx's client_header_timeout, 60 s; Envoy's request_headers_timeout); ``idle_timeout``:
        how long a connection without streams stays open (Envoy 1 h, nginx 75 s; 600 s here, twice the
        pool's 300 s, so that a pooled client always closes first and never reuses a closing connection)."""
        self.certificates = certificates
        self._bundle = bundle
        self.policy = policy
        self.connect = connect
        self.established = established
        self.settings = settings
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.check_authority_ip = check_authority_ip
        self.tunnels: set[ServerTunnel] = set()
        # Upstream connects under way, in the order they started (loop time): one timer for all of them, set for the
        # oldest, instead of a timeout made and cancelled per stream (asyncio.timeout's context manager, task lookup
        # and timer cost more than the rest of admitting a stream).
        self._connecting: dict[_Pending, float] = {}
        self._connect_timer: asyncio.TimerHandle | None = None
        self.stats: Counter[str] = Counter()
        self.draining = False  # stop_accepting(): new streams are refused
        self._acceptor: Acceptor | None = None

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle() if callable(self._bundle) else self._bundle

    async def start(self, host: str = "0.0.0.0", port: int = 15008, *, sock: socket.socket | None = None,
                    reuse_port: bool = False) -> None:
        """Listen on ``host:port``, or on ``sock`` (the agent's IP_TRANSPARENT listener)."""
        if sock is None:
            sock = listener(host, port, reuse_port=reuse_port)
        # Accepting ourselves: the certificate depends on the accepted socket's local address, and TLS
        # must own the socket from its first byte.
        self._acceptor = Acceptor(sock, self.handshake, "HBONE server")
        self._acceptor.start()

    @property
    def address(self) -> Address:
        assert self._acceptor is not None
        return self._acceptor.address

    async def stop_accepting(self) -> None:
        """Take no new tunnel connections, and no new streams on the open ones: those are refused with
        REFUSED_STREAM (RFC 9113 8.7: not processed, safe to retry), which a client retries on a new connection,
        reaching whoever listens now (the next agent, during an upgrade). The streams open now carry on."""
        self.draining = True
        if self._acceptor is not None:
            await self._acceptor.stop()

    async def close(self) -> None:
        for tunnel in list(self.tunnels):
            tunnel.close()
        if self._acceptor is not None:
            await self._acceptor.close()
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self._connecting.clear()

    def count(self, what: str) -> None:
        self.stats[what] += 1

    async def handshake(self, sock: socket.socket) -> None:
        ends = accepted_addresses(sock)
        if ends is None:  # gone already
            return
        source, destination = ends
        try:
            cert = await self.certificates(destination[0])
        except Exception as e:  # no certificate: nothing to present, refuse the connection
            cert = None
            log.warning("HBONE from %s: no certificate for %s: %s", source, destination[0], e)
        if cert is None:
            self.count("no_certificate")
            sock.close()
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: ServerTunnel(self, source, destination), sock,
                                               ssl=server_context(cert, self.bundle),
                                               ssl_handshake_timeout=self.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self.count("handshake_failed")
            log.warning("HBONE from %s: TLS handshake failed: %s", source, _reason(e))
            sock.close()

    def handle_connect(self, tunnel: ServerTunnel, ev: ConnectRequest) -> None:
        if tunnel.conn.closed is not None:  # ended later in the same read: no answer can be sent
            return
        if self.draining:
            self.count("refused_draining")
            tunnel.server_conn.reset(ev.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        request = InboundRequest(tunnel.peer, tunnel.source, tunnel.destination, ev.authority, ev.headers)
        if self.check_authority_ip and ev.authority.ip != tunnel.destination[0]:
            self.count("rejected_request")
            log.info("HBONE from %s: authority %s is not this connection's destination %s -> 400",
                     tunnel.source, ev.authority, tunnel.destination[0])
            tunnel.server_conn.respond(ev.stream_id, 400)
            return
        if self.policy is not None:
            denial = self.policy(request)
            if denial is not None:
                self.count("denied")
                log.info("HBONE %s -> %s denied: %s -> 401", request.peer, request.target, denial)
                tunnel.server_conn.respond(ev.stream_id, 401)
                return
        pending = _Pending()
        pending.bind(tunnel, ev.stream_id)
        assert self._acceptor is not None
        pending.connecting = self._acceptor.spawn(self._open_upstream(tunnel, pending, request))
        loop, pending.connects = tunnel.loop, self._connecting
        self._connecting[pending] = now = loop.time()
        if self._connect_timer is None:
            self._connect_timer = loop.call_at(now + self.connect_timeout, self._connects_due, loop)

    def _connects_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the connects begun ``connect_timeout`` ago or more (each then answers 503), and set the timer for
        the oldest one left."""
        self._connect_timer = None
        started_by = loop.time() - self.connect_timeout
        expired: list[_Pending] = []
        for pending, started in self._connecting.items():  # oldest first: only the expired ones and one more are read
            if started > started_by:
                self._connect_timer = loop.call_at(started + self.connect_timeout, self._connects_due, loop)
                break
            expired.append(pending)
        for pending in expired:
            del self._connecting[pending]
            pending.timed_out = True
            if pending.connecting is not None:
                pending.connecting.cancel()

    async def _open_upstream(self, tunnel: ServerTunnel, pending: _Pending, request: InboundRequest) -> None:
        try:
            handler = await self.connect(request)
        except (OSError, TimeoutError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                if not pending.timed_out:
                    raise  # the stream was reset, or the server is closing
                e = TimeoutError()
            self.count("upstream_failed")
            log.info("HBONE %s -> %s: upstream unreachable: %s -> 503", request.peer, request.target, _reason(e))
            if not pending.closed:
                pending.finish("upstream connect failed")
                tunnel.server_conn.respond(pending.stream_id, 503)
                tunnel.flush()
            return
        finally:
            self._connecting.pop(pending, None)
        if pending.closed:  # the stream or the tunnel went while we connected
            if self.established is not None:
                self.established(request, handler)
            handler.on_reset("stream closed before its upstream connected")
            return
        self.count("accepted")
        tunnel.server_conn.accept(pending.stream_id)
        pending.hand_over(handler)
        tunnel.flush()
        if self.established is not None:
            self.established(request, handler)


def _reason(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"{e.reason}: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return str(e) or type(e).__name__
