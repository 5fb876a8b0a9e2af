"""A gRPC client for unary calls over TLS: what the agent needs to ask the CA for certificates.

    channel = Channel("ambit-ca.ambit-system.svc", 15012, context, server_hostname="ambit-ca.ambit-system.svc")
    reply = await channel.unary("/pkg.Service/Method", request.SerializeToString(),
                                metadata=[("authorization", "Bearer ...")], timeout=10.0)
    channel.close()

Calls share one HTTP/2 connection, opened when a call needs it (the server's certificate checked against the
context's roots for ``server_hostname``, ALPN h2 required) and closed after ``idle`` seconds without a call: the
agent asks the CA at start-up and at renewals hours apart. Any failure is an ``RpcError``: the server's status, or
UNAVAILABLE when it cannot be reached or the connection ends, DEADLINE_EXCEEDED when ``timeout`` passes.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from agent.rpc.status import RpcError, StatusCode, format_timeout, status_of_reset
from agent.rpc.transport import ConnectionClosed, H2Protocol
from agent.rpc.wire import Headers, MessageReader, frame, request_headers, response_status

# A stream the server refused (it processed nothing of it: its stream limit was reached, say, as a burst of calls
# can reach it before its slots are freed) is sent again after a pause growing to this, until the deadline, as
# grpc's transparent retry does.
REFUSED_PAUSE = 0.2
TLS_SHUTDOWN_TIMEOUT = 1.0  # seconds a closed connection waits for the close_notify grpc never sends (asyncio: 30)


class _Refused(RpcError):
    """The server refused the stream (RST_STREAM REFUSED_STREAM): nothing of it was processed."""


@dataclass(slots=True)
class _Pending:
    done: asyncio.Future[bytes]
    headers: Headers = ()
    trailers: Headers | None = None
    reader: MessageReader = field(default_factory=MessageReader)
    messages: list[bytes] = field(default_factory=list)


class _ClientConnection(H2Protocol):
    def __init__(self, address: str) -> None:
        super().__init__(client_side=True)
        self.address = address
        self.calls: dict[int, _Pending] = {}
        self.going_away = False
        self.settings_received = asyncio.Event()  # the server's SETTINGS (its stream limit among them)
        self._stream_closed = asyncio.Event()  # replaced each time it is set: wakes every waiter

    def event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.going_away = True
            self._fail_all(f"the server ended the connection (GOAWAY, error code {event.error_code})")
            self.close()
            return
        call = self.calls.get(getattr(event, "stream_id", 0) or 0)
        if call is None or call.done.done():
            return
        if isinstance(event, h2.events.ResponseReceived):
            call.headers = event.headers or []
        elif isinstance(event, h2.events.TrailersReceived):
            call.trailers = event.headers or []
        elif isinstance(event, h2.events.DataReceived):
            try:
                call.messages += call.reader.feed(event.data or b"")
            except RpcError as e:
                call.done.set_exception(e)
                self.reset(event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self._finish(call)
        elif isinstance(event, h2.events.StreamReset):
            kind = _Refused if event.error_code == ErrorCodes.REFUSED_STREAM else RpcError
            call.done.set_exception(kind(status_of_reset(event.error_code),
                                         f"the server reset the stream (error code {event.error_code})"))

    def _finish(self, call: _Pending) -> None:
        error = response_status(call.headers, call.trailers)
        if error is None and (call.reader.partial or len(call.messages) != 1):
            error = RpcError(StatusCode.INTERNAL, "a truncated reply message" if call.reader.partial else
                             f"{len(call.messages)} reply messages to a unary call")
        if error is not None:
            call.done.set_exception(error)
        else:
            call.done.set_result(call.messages[0])

    def _fail_all(self, why: str) -> None:
        for call in self.calls.values():
            if not call.done.done():
                call.done.set_exception(RpcError(StatusCode.UNAVAILABLE, f"{self.address}: {why}"))

    def ended(self, exc: Exception | None) -> None:
        self._fail_all(f"the connection ended{f': {exc}' if exc else ''}")
        self.stream_closed()
        self.settings_received.set()

    def stream_closed(self) -> None:
        closed, self._stream_closed = self._stream_closed, asyncio.Event()
        closed.set()

    async def open_stream(self) -> int:
        """A new stream's id, once the server's concurrent-stream limit allows one more."""
        while self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            if self.closed:
                raise ConnectionClosed("the connection ended")
            await self._stream_closed.wait()
        return int(self.h2.get_next_available_stream_id())


class Channel:
    """Unary calls to one server; see the module's docstring."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, *, server_hostname: str,
                 connect_timeout: float = 10.0, idle: float = 5.0) -> None:
        self.host, self.port = host, port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._context = context
        self._server_hostname = server_hostname
        self._connect_timeout = connect_timeout
        self._idle = idle
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._retired = False

    async def _connection(self) -> _ClientConnection:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and not conn.closed and not conn.going_away:
                return conn
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _, conn = await loop.create_connection(
                        lambda: _ClientConnection(self.address), self.host, self.port, ssl=self._context,
                        server_hostname=self._server_hostname, ssl_handshake_timeout=self._connect_timeout,
                        ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
            except (OSError, TimeoutError) as e:
                raise RpcError(StatusCode.UNAVAILABLE,
                               f"cannot connect to {self.address}: {e or type(e).__name__}") from None
            assert conn.transport is not None
            tls = conn.transport.get_extra_info("ssl_object")
            if tls is None or tls.selected_alpn_protocol() != "h2":
                conn.close()
                raise RpcError(StatusCode.UNAVAILABLE, f"{self.address} did not negotiate HTTP/2 (ALPN h2)")
            await conn.settings_received.wait()  # its stream limit known before streams are opened
            if conn.closed:
                raise RpcError(StatusCode.UNAVAILABLE, f"{self.address} closed the connection at once")
            self._conn = conn
            return conn

    async def unary(self, path: str, request: bytes, *, metadata: Sequence[tuple[str, str]] = (),
                    timeout: float = 10.0) -> bytes:  # noqa: ASYNC109 (sent as grpc-timeout: the server keeps it too)
        """The reply's bytes; RpcError for any other outcome."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        deadline = asyncio.get_running_loop().time() + timeout
        refused = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        return await self._attempt(path, request, metadata, deadline)
                    except _Refused:
                        refused += 1
                        await asyncio.sleep(min(REFUSED_PAUSE, 0.01 * refused))
        except TimeoutError:
            after = f" (refused {refused} times)" if refused else ""
            raise RpcError(StatusCode.DEADLINE_EXCEEDED,
                           f"no reply from {self.address} within {timeout:g}s{after}") from None

    async def _attempt(self, path: str, request: bytes, metadata: Sequence[tuple[str, str]], deadline: float) -> bytes:
        conn: _ClientConnection | None = None
        stream_id = 0
        try:
            conn = await self._connection()
            stream_id = await conn.open_stream()
            call = _Pending(asyncio.get_running_loop().create_future())
            conn.calls[stream_id] = call
            left = deadline - asyncio.get_running_loop().time()
            conn.h2.send_headers(stream_id, request_headers(self._server_hostname, path,
                                                            timeout=format_timeout(left), metadata=metadata))
            await conn.send_data(stream_id, frame(request), end_stream=True)
            return await call.done
        except (ConnectionClosed, h2.exceptions.ProtocolError) as e:
            raise RpcError(StatusCode.UNAVAILABLE, f"{self.address}: the connection ended: {e}") from None
        finally:
            if conn is not None and stream_id:
                call_left = conn.calls.pop(stream_id, None)
                if call_left is not None and not call_left.done.done():
                    conn.reset(stream_id)  # timed out or cancelled: the server may stop too
                conn.stream_closed()
                if not conn.calls:
                    self._when_idle()

    def _when_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._retired:
            self._close_idle()
        else:
            self._idle_timer = asyncio.get_running_loop().call_later(self._idle, self._close_idle)

    def _close_idle(self) -> None:
        self._idle_timer = None
        if self._conn is not None and not self._conn.calls:
            self._conn.close()
            self._conn = None

    @property
    def connected(self) -> bool:
        """Whether a connection is open (or being closed)."""
        return self._conn is not None and not self._conn.closed

    def retire(self) -> None:
        """Close the connection once the calls in progress have finished (a replaced channel)."""
        self._retired = True
        if self._conn is None or not self._conn.calls:
            self.close()

    def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
