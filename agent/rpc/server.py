"""A gRPC server for unary and server-streaming methods, on unix sockets and TLS listeners.

    server = RpcServer({"/pkg.Service/Method": Method(Request.FromString, streaming=handler)})
    await server.listen_unix("/run/x.sock")                   # and/or
    port = await server.listen_tls("0.0.0.0", 0, ssl_context)  # SO_REUSEPORT: a next server may bind beside
    ...
    await server.stop(grace=1.0)

A handler gets the parsed request and a ``Call`` (who called, the metadata) and returns the reply (unary) or
yields the replies (server streaming); it ends the call with another status by raising ``RpcError``. A handler
that raises anything else answers INTERNAL (logged, the exception not shown to the client). The client's
grpc-timeout is enforced (DEADLINE_EXCEEDED), a client that resets its stream cancels its handler.

What is not a call this server takes is answered as gRPC servers answer it, each stream on its own while the
connection serves on: not POST 405, not application/grpc 415, an unknown method UNIMPLEMENTED, a compressed
request UNIMPLEMENTED or INTERNAL, a request of no message, of more than one, of a truncated one or one that does
not parse INTERNAL, a message over the limit RESOURCE_EXHAUSTED. An HTTP/2 error ends that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from agent.rpc.status import RpcError, StatusCode
from agent.rpc.transport import ConnectionClosed, H2Protocol
from agent.rpc.wire import MAX_MESSAGE, RESPONSE_HEADERS, MessageReader, NotGrpc, frame, read_request, trailers
from hbone import format_address

log = logging.getLogger(__name__)

# Bytes of requests one connection may have sent and not had handled yet (received DATA is acknowledged at once):
# one message of the largest size, however many streams carry them.
MAX_BUFFERED = MAX_MESSAGE + 5


class Reply(Protocol):
    def SerializeToString(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Peer:
    """Who called: over a unix socket, or over TLS with the SPIFFE ID of the client's certificate (its one
    ``spiffe://`` URI SAN, as gRPC's auth context has it; None when it has none or several)."""

    transport: Literal["unix", "tls"]
    address: str
    identity: str | None = None


@dataclass(frozen=True, slots=True)
class Call:
    peer: Peer
    metadata: Mapping[str, str]


Unary = Callable[[Any, Call], Awaitable[Reply]]
Streaming = Callable[[Any, Call], AsyncIterator[Reply]]


@dataclass(frozen=True)
class Method:
    """One RPC: how its request is parsed, and its handler, unary or server-streaming."""

    parse: Callable[[bytes], Any]
    unary: Unary | None = None
    streaming: Streaming | None = None


def spiffe_identity(tls: ssl.SSLObject | None) -> str | None:
    """The client certificate's one spiffe:// URI SAN (as OpenSSL decoded the verified certificate)."""
    cert = tls.getpeercert() if tls is not None else None
    sans = cert.get("subjectAltName", ()) if cert else ()
    uris = [e[1] for e in sans if isinstance(e, tuple) and e[0] == "URI" and str(e[1]).startswith("spiffe://")]
    return str(uris[0]) if len(uris) == 1 else None


@dataclass(slots=True)
class _Stream:
    path: str
    method: Method
    call: Call
    timeout: float | None
    reader: MessageReader = field(default_factory=MessageReader)
    messages: list[bytes] = field(default_factory=list)
    received: int = 0  # bytes of DATA taken and not handled yet
    task: asyncio.Task[None] | None = None


class _Connection(H2Protocol):
    def __init__(self, server: RpcServer, transport_kind: Literal["unix", "tls"]) -> None:
        super().__init__(client_side=False)
        self.server = server
        self.kind = transport_kind
        self.peer: Peer | None = None
        self.streams: dict[int, _Stream] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.buffered = 0  # the streams' ``received``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.kind == "unix":
            self.peer = Peer("unix", f"unix:{transport.get_extra_info('sockname') or ''}")
        else:
            host, port = transport.get_extra_info("peername")[:2]
            self.peer = Peer("tls", format_address(host, port), spiffe_identity(transport.get_extra_info("ssl_object")))
        self.server.connections.add(self)

    def ended(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in self.tasks:
            task.cancel()
        self.streams.clear()

    # -- events
    def event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event.stream_id, event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            self._data(event.stream_id, event.data or b"")
        elif isinstance(event, h2.events.StreamEnded):
            self._ended(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream = self._drop(event.stream_id)
            if stream is not None and stream.task is not None:
                stream.task.cancel()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.close()  # h2 sends nothing more once the peer has said GOAWAY

    def _request(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.draining:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        try:
            request = read_request(headers)
            method = self.server.methods.get(request.path)
            if method is None:
                raise RpcError(StatusCode.UNIMPLEMENTED, f"unknown method {request.path}")
        except NotGrpc as e:
            self._spawn(self._refuse_http(stream_id, e.status, str(e)))
            return
        except RpcError as e:
            self._answer(stream_id, e.code, e.details)
            return
        assert self.peer is not None
        self.streams[stream_id] = _Stream(request.path, method, Call(self.peer, request.metadata), request.timeout)

    def _data(self, stream_id: int, data: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.task is not None:
            return
        try:
            if self.buffered + len(data) > MAX_BUFFERED:
                raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"the requests in progress on this connection exceed "
                                                              f"{MAX_BUFFERED} bytes")
            stream.received += len(data)
            self.buffered += len(data)
            stream.messages += stream.reader.feed(data)
            if len(stream.messages) > 1:
                raise RpcError(StatusCode.INTERNAL, "more than one request message for a method that takes one")
        except RpcError as e:
            self._drop(stream_id)
            self._answer(stream_id, e.code, e.details)

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.task is not None:
            return
        problem = ("a truncated request message" if stream.reader.partial else
                   "no request message" if not stream.messages else None)
        if problem is not None:
            self._drop(stream_id)
            self._answer(stream_id, StatusCode.INTERNAL, problem)
            return
        self.buffered -= stream.received
        stream.received = 0
        stream.task = self._spawn(self._run(stream_id, stream, stream.messages.pop()))

    def _drop(self, stream_id: int) -> _Stream | None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.buffered -= stream.received
        return stream

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.draining and not self.tasks:
            self.server.drained.set()

    # -- answers
    def _answer(self, stream_id: int, code: StatusCode, details: str, *, headers_sent: bool = False) -> None:
        """End the stream with ``code``: trailers after the replies, or a Trailers-Only response; a client still
        sending is told to stop (RST_STREAM NO_ERROR)."""
        if self.closed:
            return
        block = trailers(code, details) if headers_sent else [*RESPONSE_HEADERS, *trailers(code, details)]
        try:
            self.h2.send_headers(stream_id, block, end_stream=True)
        except h2.exceptions.ProtocolError:  # reset meanwhile
            return
        stream = self.h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self.reset(stream_id, ErrorCodes.NO_ERROR)
        self.flush()

    async def _refuse_http(self, stream_id: int, status: int, message: str) -> None:
        with contextlib.suppress(ConnectionClosed, h2.exceptions.ProtocolError):
            self.h2.send_headers(stream_id, [(b":status", str(status).encode()),
                                             (b"content-type", b"text/plain; charset=utf-8")])
            await self.send_data(stream_id, message.encode() + b"\n", end_stream=True)
            stream = self.h2.streams.get(stream_id)
            if stream is not None and not stream.closed:
                self.reset(stream_id, ErrorCodes.NO_ERROR)  # a client still sending its body

    async def _run(self, stream_id: int, stream: _Stream, message: bytes) -> None:
        headers_sent = False
        method = stream.method
        try:
            try:
                request = method.parse(message)
            except Exception as e:
                raise RpcError(StatusCode.INTERNAL, f"the request message does not parse: {e}") from None
            async with asyncio.timeout(stream.timeout):
                if method.unary is not None:
                    replies: AsyncIterator[Reply] = _one(method.unary(request, stream.call))
                else:
                    assert method.streaming is not None
                    replies = method.streaming(request, stream.call)
                async with contextlib.aclosing(replies):  # type: ignore[type-var]  # (an async generator)
                    async for reply in replies:
                        if not headers_sent:
                            self.h2.send_headers(stream_id, RESPONSE_HEADERS)
                            headers_sent = True
                        await self.send_data(stream_id, frame(reply.SerializeToString()))
            code, details = StatusCode.OK, ""
        except RpcError as e:
            code, details = e.code, e.details
        except TimeoutError:
            code, details = StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        except (ConnectionClosed, h2.exceptions.ProtocolError):
            return  # the client went away or reset the stream
        except Exception as e:
            log.exception("%s from %s failed", stream.path, stream.call.peer.address)
            code, details = StatusCode.INTERNAL, f"the server failed: {type(e).__name__}"
        finally:
            self._drop(stream_id)
        self._answer(stream_id, code, details, headers_sent=headers_sent)

    def goaway(self) -> None:
        """A graceful GOAWAY: streams open so far are served, new ones refused (h2's own ends the connection)."""
        if self.closed or self.draining:
            return
        self.draining = True
        self.flush()
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.h2.highest_inbound_stream_id
        goaway.error_code = ErrorCodes.NO_ERROR
        assert self.transport is not None
        self.transport.write(goaway.serialize())
        if not self.tasks and not self.streams:
            self.close()


WILDCARDS = ("", "0.0.0.0", "::")


def _wildcard_socket(port: int) -> socket.socket:
    """A listening socket on every address: IPv6 with IPv4-mapped addresses, or IPv4 alone where IPv6 is off."""
    try:
        return _listening(socket.AF_INET6, ("::", port))
    except OSError:
        return _listening(socket.AF_INET, ("0.0.0.0", port))


def _listening(family: socket.AddressFamily, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def _one(reply: Awaitable[Reply]) -> AsyncIterator[Reply]:
    yield await reply


class RpcServer:
    """The methods, served on every listener added."""

    def __init__(self, methods: Mapping[str, Method]) -> None:
        self.methods = dict(methods)
        self.connections: set[_Connection] = set()
        self.drained = asyncio.Event()
        self._listeners: list[asyncio.Server] = []

    async def listen_unix(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        self._listeners.append(await loop.create_unix_server(lambda: _Connection(self, "unix"), path))

    async def listen_tls(self, host: str, port: int, context: ssl.SSLContext) -> int:
        """Listen on ``host``:``port`` (0: any free port) with SO_REUSEPORT; returns the port. A wildcard host
        ("", 0.0.0.0, ::) is every address of both families where the host has IPv6, as gRPC binds it."""
        loop = asyncio.get_running_loop()
        if host in WILDCARDS:
            listener = await loop.create_server(lambda: _Connection(self, "tls"), sock=_wildcard_socket(port),
                                                ssl=context, ssl_handshake_timeout=10.0)
        else:
            listener = await loop.create_server(lambda: _Connection(self, "tls"), host, port, ssl=context,
                                                reuse_port=True, ssl_handshake_timeout=10.0)
        self._listeners.append(listener)
        return int(listener.sockets[0].getsockname()[1])

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening; let the calls in progress finish for ``grace`` seconds (None: none), then cancel them
        and close every connection."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        connections = list(self.connections)
        for conn in connections:
            conn.goaway()
        if grace and any(c.tasks for c in connections):
            self.drained.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    while any(c.tasks for c in connections if not c.closed):
                        await self.drained.wait()
                        self.drained.clear()
        tasks = [t for c in connections for t in c.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in connections:
            conn.flush()
            conn.close()
