"""The HBONE client: a mutual-TLS connection to a peer's 15008 on which CONNECT streams are opened.

The client presents the SOURCE workload's certificate and accepts the server only if its certificate
carries the EXPECTED destination identity; the check runs before a single HTTP/2 byte is sent.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable, Mapping

from h2.errors import ErrorCodes

from hbone.addresses import Address, format_address
from hbone.authority import Authority
from hbone.events import ConnectionEnded, ConnectResponse, Event, GoAwayReceived, StreamReset
from hbone.identity import (
    IdentityError,
    SpiffeId,
    TrustBundle,
    WorkloadCertificate,
    client_context,
    verify_peer,
)
from hbone.protocol import ClientConnection, Settings
from hbone.sockets import dial
from hbone.tunnel import StreamHandler, Tunnel


class HboneError(ConnectionError):
    """Opening a tunnel or stream failed; the message says where and why."""


class StreamRefused(HboneError):
    """The peer never processed the stream (REFUSED_STREAM, or beyond a GOAWAY): safe to retry elsewhere."""


class StreamFailed(HboneError):
    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  # the CONNECT answer (0 when the stream broke before one came)


def request_headers(client: Address | None = None, service_host: str | None = None,
                    baggage: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers ztunnel sends with CONNECT: forwarded (client address), baggage, traceparent."""
    headers: dict[str, str] = {}
    if client is not None:
        headers["forwarded"] = f'for="{format_address(*client)}"' + (f";host={service_host}" if service_host else "")
    if baggage:
        headers["baggage"] = ",".join(f"{k}={v}" for k, v in baggage.items())
    # Trace ids need to be unique, not secret: the process's PRNG (seeded from the OS), not two getrandom()
    # system calls per connection. All-zero ids are invalid (W3C Trace Context): ``| 1`` rules them out.
    headers["traceparent"] = f"00-{random.getrandbits(128) | 1:032x}-{random.getrandbits(64) | 1:016x}-00"
    return headers


class ClientTunnel(Tunnel):
    """Client side of one tunnel connection: sends CONNECTs and settles their answers.

    A stream that fails before its 200 is detached from its relay without touching the relay's TCP
    connection, so the caller may retry it on another tunnel or close it as it sees fit.
    """

    def __init__(self, settings: Settings, bundle: TrustBundle, expected: SpiffeId) -> None:
        super().__init__()
        self.conn = self.client_conn = ClientConnection(settings)
        self.bundle, self.expected = bundle, expected
        self.peer_error: IdentityError | None = None
        self._answers: dict[int, asyncio.Future[ConnectResponse]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            verify_peer(transport.get_extra_info("ssl_object"), self.bundle, self.expected)
        except IdentityError as e:
            self.peer_error = e
            transport.abort()  # type: ignore[attr-defined]
            return
        super().connection_made(transport)

    @property
    def usable(self) -> bool:
        return (self.ended is None and not self.draining and self.transport is not None
                and not self.transport.is_closing())

    @property
    def stream_limit(self) -> int:
        return self.client_conn.peer_stream_limit

    def open(self, relay: StreamHandler, authority: Authority,
             headers: Mapping[str, str]) -> asyncio.Future[ConnectResponse]:
        """Send CONNECT for ``relay``; the future resolves on 200 and raises StreamRefused/StreamFailed."""
        fut: asyncio.Future[ConnectResponse] = self.loop.create_future()
        if not self.usable:
            fut.set_exception(StreamRefused("tunnel connection is closed"))
            return fut
        stream_id = self.client_conn.open(authority, headers)
        if stream_id is None:
            fut.set_exception(StreamRefused("tunnel connection has no free stream"))
            return fut
        relay.bind(self, stream_id)
        relay.on_open()
        self._answers[stream_id] = fut
        self.flush()
        return fut

    def _settle(self, stream_id: int, exc: HboneError | None, response: ConnectResponse | None = None) -> None:
        fut = self._answers.pop(stream_id, None)
        relay = self.streams.get(stream_id)
        if fut is None or fut.done():
            return
        if exc is None:
            fut.set_result(response)  # type: ignore[arg-type]
            if relay is not None:
                relay.start()
            return
        if relay is not None:
            del self.streams[stream_id]
            relay.tunnel = None
        self.client_conn.reset(stream_id, ErrorCodes.CANCEL)  # give the stream's slot back on both ends
        self.flush()
        fut.set_exception(exc)

    def handle_request_or_response(self, ev: Event) -> None:
        if isinstance(ev, ConnectResponse):
            failure = None if ev.status == 200 else StreamFailed(f"CONNECT answered {ev.status}", ev.status)
            self._settle(ev.stream_id, failure, ev)

    def stream_reset(self, ev: StreamReset) -> None:
        if ev.stream_id in self._answers:
            kind = StreamRefused if ev.refused else StreamFailed
            self._settle(ev.stream_id, kind(f"stream reset by server before an answer (code {ev.error_code})"))
        else:
            super().stream_reset(ev)

    def going_away(self, ev: GoAwayReceived) -> None:
        """The server is closing: streams beyond its last one were never processed (retry elsewhere); the
        others carry on to their end."""
        for stream_id in [s for s in self._answers if s > ev.last_stream_id]:
            self._settle(stream_id, StreamRefused(f"tunnel going away: {ev.reason}"))
        super().going_away(ev)

    def connection_ended(self, ev: ConnectionEnded) -> None:
        self._fail_pending(ev)
        super().connection_ended(ev)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_pending(ConnectionEnded(0, f"connection lost: {exc}" if exc else "connection closed"))
        super().connection_lost(exc)

    def _fail_pending(self, ev: ConnectionEnded) -> None:
        for stream_id in list(self._answers):
            unprocessed = ev.last_stream_id is not None and stream_id > ev.last_stream_id
            kind = StreamRefused if unprocessed else StreamFailed
            self._settle(stream_id, kind(f"tunnel ended before an answer: {ev.reason}"))


Dialer = Callable[[Address, str | None], Awaitable[socket.socket]]  # (address, source ip) -> connected socket


async def open_tunnel(address: Address, cert: WorkloadCertificate, expected: SpiffeId, bundle: TrustBundle,
                      settings: Settings = Settings(), handshake_timeout: float = 10.0,
                      dial: Dialer = dial, source_ip: str | None = None) -> ClientTunnel:
    """Connect to an HBONE server at ``address`` as ``cert``'s workload, expecting ``expected``."""
    loop = asyncio.get_running_loop()
    tunnel = ClientTunnel(settings, bundle, expected)
    try:
        async with asyncio.timeout(handshake_timeout):
            sock = await dial(address, source_ip)
            await loop.create_connection(lambda: tunnel, sock=sock, server_hostname=address[0],
                                         ssl=client_context(cert, bundle), ssl_handshake_timeout=handshake_timeout)
    except TimeoutError:
        raise HboneError(f"HBONE connect to {format_address(*address)} timed out after {handshake_timeout}s") from None
    except OSError as e:
        raise HboneError(f"HBONE connect to {format_address(*address)} failed: {e}") from e
    if tunnel.peer_error is not None:
        raise HboneError(f"HBONE server at {format_address(*address)} rejected: {tunnel.peer_error}")
    return tunnel
