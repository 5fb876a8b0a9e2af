"""An HTTP/1.1 client on asyncio streams: TLS, keep-alive, Content-Length and chunked bodies, streamed answers.

    client = HttpClient()
    async with await client.request("GET", "https://10.0.0.1:6443/api/v1/pods?watch=true", tls=context,
                                    timeouts=Timeouts(connect=10, read=330)) as response:
        async for line in response.lines(max_line=2**21):
            ...

``request`` returns once the status line and headers are in; the body is read with ``read()``, ``chunks()`` or
``lines()``. Leaving the ``async with`` gives a connection whose answer was read to the end back to the pool (keep-
alive), and closes any other. A pooled connection the server has closed meanwhile fails the next request before any
byte of an answer: an idempotent request is then sent again, once, on a new connection (as Go's net/http does).

Every failure is an ``HttpError`` naming the request (``GET https://...``): ``ConnectError`` (TCP, TLS,
``CertificateError`` for verification), ``ProtocolError`` (what the server sent is not HTTP/1.1, and where in the
answer), ``HttpTimeout`` (also a ``TimeoutError``). HTTP error statuses are answers, not exceptions.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import h11

from agent.http.errors import CertificateError, ConnectError, HttpTimeout, LineTooLong, ProtocolError
from agent.http.proxy import Proxies, Proxy, ProxyConfigError

MAX_HEADERS = 64 * 1024  # bytes: a response's status line and headers (and a chunk-size line) must fit
MAX_BODY = 256 * 2**20  # bytes: read()'s default bound
READ_SIZE = 64 * 1024
IDLE_KEEP = 30.0  # seconds an idle connection stays pooled (servers close theirs after 60-120 s idle)
IDLE_PER_ORIGIN = 4
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds, None for no bound. ``total``: the whole exchange, body included; ``connect``: TCP and TLS set-up
    (default: ``total``); ``read``: each wait for more of the answer (a watch has no total, only this)."""

    total: float | None = None
    connect: float | None = None
    read: float | None = None


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    server_hostname: str | None
    proxy: Proxy | None


class _Connection:
    """One connection and its codec; ``received`` counts the bytes of the current answer, to say where."""

    def __init__(self, origin: _Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.origin, self.reader, self.writer = origin, reader, writer
        self.codec = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADERS)
        self.received = 0
        self.idle_since = 0.0
        self.closed = False  # by this side

    def usable(self, now: float) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing() and now - self.idle_since < IDLE_KEEP

    def close(self) -> None:
        self.closed = True
        self.writer.close()


_TOO_LONG = f"a header block (status line, headers or chunk size line) longer than {MAX_HEADERS} bytes"


def head_size(event: h11.Request | h11.Response | h11.InformationalResponse) -> int:
    """About the bytes of a request's or answer's first line and headers (for the header block's bound)."""
    return 32 + sum(len(name) + len(value) + 4 for name, value in event.headers)


class _Stale(Exception):
    """The connection ended before any byte of the answer: a pooled one the server had closed."""


def _remaining(deadline: float | None, bound: float | None) -> float | None:
    if deadline is None:
        return bound
    left = max(0.0, deadline - asyncio.get_running_loop().time())
    return left if bound is None else min(left, bound)


class Response:
    """The status and headers of an answer, its body still to be read (see the module docstring)."""

    def __init__(self, client: HttpClient, conn: _Connection, name: str, event: h11.Response, timeouts: Timeouts,
                 deadline: float | None) -> None:
        self.request = name  # "METHOD URL", for messages
        self.status = event.status_code
        self.reason = event.reason.decode("latin-1")
        self.headers: dict[str, str] = {}  # lower-case names; repeated headers joined with ", "
        for key, value in event.headers:
            name_text, value_text = key.decode("latin-1"), value.decode("latin-1")
            self.headers[name_text] = f"{self.headers[name_text]}, {value_text}" if name_text in self.headers \
                else value_text
        self.body_bytes = 0
        self._client, self._conn, self._timeouts, self._deadline = client, conn, timeouts, deadline
        self._done = False
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, de-chunked."""
        while not self._done:
            try:  # no _Stale here: the status line was received
                event = await _next_event(self._conn, self.request, self._timeouts, self._deadline)
            except ProtocolError as e:
                raise ProtocolError(self.request, f"{e.what}, after {self.body_bytes} bytes of the body") from None
            if isinstance(event, h11.Data):
                self.body_bytes += len(event.data)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True

    async def read(self, limit: int = MAX_BODY) -> bytes:
        """The whole body; ``ProtocolError`` past ``limit`` bytes."""
        parts: list[bytes] = []
        async for chunk in self.chunks():
            if self.body_bytes > limit:
                raise ProtocolError(self.request, f"the body is longer than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def lines(self, max_line: int) -> AsyncIterator[bytes]:
        """The body line by line (without the newline; a last line without one is given too); ``LineTooLong``
        when a line exceeds ``max_line`` bytes."""
        line = bytearray()
        line_start = 0  # where ``line`` starts in the body
        async for chunk in self.chunks():
            chunk_start, start = self.body_bytes - len(chunk), 0
            while True:
                end = chunk.find(b"\n", start)
                line += chunk[start:] if end < 0 else chunk[start:end]
                if len(line) > max_line:
                    raise LineTooLong(self.request, f"a line longer than {max_line} bytes starts at byte "
                                                    f"{line_start} of the body")
                if end < 0:
                    break
                yield bytes(line)
                line.clear()
                start = end + 1
                line_start = chunk_start + start
        if line:
            yield bytes(line)

    async def close(self) -> None:
        """Back to the pool if the answer was read to its end and the connection may be kept, else closed."""
        if self._closed:
            return
        self._closed = True
        self._client._release(self._conn, reusable=self._done)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


async def _next_event(conn: _Connection, name: str, timeouts: Timeouts, deadline: float | None) -> Any:
    """The codec's next event, reading as needed. ``_Stale`` when the connection ends before any byte."""
    codec = conn.codec
    while True:
        try:
            event = codec.next_event()
        except h11.RemoteProtocolError as e:
            what = str(e)
            if what == "Receive buffer too long":  # the only incomplete event that can grow: a header block
                what = _TOO_LONG
            raise ProtocolError(name, f"malformed answer: {what}") from None
        if isinstance(event, h11.Response | h11.InformationalResponse) and head_size(event) > MAX_HEADERS:
            # h11 bounds only a header block still incomplete; one that arrived whole in a read is checked here
            raise ProtocolError(name, f"malformed answer: {_TOO_LONG}")
        if event is not h11.NEED_DATA:
            return event
        wait = _remaining(deadline, timeouts.read)
        try:
            async with asyncio.timeout(wait):
                data = await conn.reader.read(READ_SIZE)
        except TimeoutError:
            bound = f"{timeouts.read:g} s" if wait == timeouts.read else f"the request's {timeouts.total:g} s"
            raise HttpTimeout(name, f"no answer within {bound}" if conn.received == 0 else
                              f"the answer stopped after {conn.received} bytes, for {bound}") from None
        except OSError as e:
            if conn.received == 0:
                raise _Stale from None
            raise ConnectError(name, f"the connection failed after {conn.received} bytes of the answer: "
                                     f"{e.strerror or e}") from None
        if not data and conn.closed:
            raise ConnectError(name, f"closed by this side after {conn.received} bytes of the answer")
        if not data and conn.received == 0:
            raise _Stale
        conn.received += len(data)
        codec.receive_data(data)


def _authority(host: str, port: int, *, always_port: bool) -> str:
    name = f"[{host}]" if ":" in host else host
    return f"{name}:{port}" if always_port else name


class HttpClient:
    """Requests over pooled connections; ``unix_socket``: every request goes to that socket (its URL's host is
    only the Host header); ``proxies``: which requests go through a proxy (agent/http/proxy.py; none by default)."""

    def __init__(self, *, unix_socket: str | None = None, proxies: Proxies | None = None) -> None:
        self.unix_socket = unix_socket
        self.proxies = proxies
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._busy: set[_Connection] = set()  # carrying a request or an answer not yet closed
        self._closed = False
        self._default_tls: ssl.SSLContext | None = None  # the system's roots, made once (part of the pool's key)
        self.connections_opened = 0  # for tests and logs

    async def request(self, method: str, url: str, *, headers: Sequence[tuple[str, str]] = (),
                      body: bytes | None = None, timeouts: Timeouts, tls: ssl.SSLContext | None = None,
                      server_hostname: str | None = None, idempotent: bool | None = None) -> Response:
        """Send one request; return once the answer's status and headers are in. ``tls``: the context for an
        https URL (default: the system's roots); ``server_hostname``: the name to verify, when not the URL's
        host; ``idempotent`` (default: by method): whether it may be sent again after a stale pooled connection."""
        name = f"{method} {url}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{name}: not an http:// or https:// URL")
        https = parts.scheme == "https"
        try:
            port = parts.port or (443 if https else 80)
        except ValueError:
            raise ValueError(f"{name}: bad port in the URL") from None
        context = (tls or self._system_roots()) if https else None
        try:
            proxy = self.proxies.for_url(parts.scheme, parts.hostname, port) if self.proxies and not \
                self.unix_socket else None
        except ProxyConfigError as e:
            raise ConnectError(name, str(e)) from None
        origin = _Origin(parts.scheme, parts.hostname, port, context, server_hostname if https else None, proxy)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = [("Host", _authority(parts.hostname, port, always_port=parts.port is not None)), *headers]
        if proxy is not None and not https:  # a plain request through a proxy names the whole URL
            target = f"http://{_authority(parts.hostname, port, always_port=True)}{target}"
            if proxy.authorization:
                fields.append(("Proxy-Authorization", proxy.authorization))
        if body is not None:
            fields.append(("Content-Length", str(len(body))))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.total if timeouts.total is not None else None
        retry = idempotent if idempotent is not None else method in IDEMPOTENT
        for attempt in range(2):
            if self._closed:
                raise ConnectError(name, "the client is closed")
            conn = self._pooled(origin, loop.time())
            reused = conn is not None
            if conn is None:
                conn = await self._open(origin, name, timeouts, deadline)
            self._busy.add(conn)
            try:
                return await self._exchange(conn, name, method, target, fields, body, timeouts, deadline)
            except _Stale:
                self._release(conn, reusable=False)
                if reused and retry and attempt == 0:
                    continue
                raise ConnectError(name, "the server closed the connection without answering") from None
            except BaseException:
                self._release(conn, reusable=False)
                raise
        raise AssertionError("unreachable")

    async def _exchange(self, conn: _Connection, name: str, method: str, target: str,
                        fields: list[tuple[str, str]], body: bytes | None, timeouts: Timeouts,
                        deadline: float | None) -> Response:
        codec = conn.codec
        data = codec.send(h11.Request(method=method, target=target, headers=fields))
        if body is not None:
            data += codec.send(h11.Data(data=body))
        data += codec.send(h11.EndOfMessage())
        conn.received = 0
        try:
            conn.writer.write(data)
            async with asyncio.timeout(_remaining(deadline, timeouts.read)):
                await conn.writer.drain()
        except TimeoutError:
            raise HttpTimeout(name, "the request could not be sent in time") from None
        except OSError:
            raise _Stale from None
        while True:
            event = await _next_event(conn, name, timeouts, deadline)
            if isinstance(event, h11.Response):
                return Response(self, conn, name, event, timeouts, deadline)
            if isinstance(event, h11.ConnectionClosed):
                raise _Stale
            # h11.InformationalResponse (1xx): wait for the final answer

    def _system_roots(self) -> ssl.SSLContext:
        if self._default_tls is None:
            self._default_tls = ssl.create_default_context()
        return self._default_tls

    def _pooled(self, origin: _Origin, now: float) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _open(self, origin: _Origin, name: str, timeouts: Timeouts, deadline: float | None) -> _Connection:
        limit = _remaining(deadline, timeouts.connect if timeouts.connect is not None else timeouts.total)
        proxy = origin.proxy
        where = self.unix_socket or (f"{origin.host}:{origin.port}" + (f" through {proxy}" if proxy else ""))
        server_hostname = (origin.server_hostname or origin.host) if origin.tls else None
        try:
            async with asyncio.timeout(limit):
                if self.unix_socket is not None:
                    reader, writer = await asyncio.open_unix_connection(self.unix_socket, ssl=origin.tls,
                                                                        server_hostname=server_hostname)
                elif proxy is None:
                    reader, writer = await asyncio.open_connection(origin.host, origin.port, ssl=origin.tls,
                                                                   server_hostname=server_hostname)
                else:
                    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                    if origin.tls is not None:
                        await self._tunnel(reader, writer, origin, name, proxy)
                        await writer.start_tls(origin.tls, server_hostname=server_hostname)
        except TimeoutError:
            raise HttpTimeout(name, f"no connection to {where} within {limit:g} s") from None
        except ssl.SSLCertVerificationError as e:
            raise CertificateError(name, f"the certificate of {where} is not trusted: "
                                         f"{e.verify_message or e.reason}") from None
        except ssl.SSLError as e:
            raise ConnectError(name, f"TLS with {where} failed: {e.reason or e}") from None
        except OSError as e:
            raise ConnectError(name, f"cannot connect to {where}: {e.strerror or e}") from None
        self.connections_opened += 1
        return _Connection(origin, reader, writer)

    @staticmethod
    async def _tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: _Origin, name: str,
                      proxy: Proxy) -> None:
        """CONNECT through ``proxy`` to the origin; raises ``ConnectError`` unless the proxy answers 2xx."""
        authority = _authority(origin.host, origin.port, always_port=True)
        tunnel = _Connection(origin, reader, writer)
        fields = [("Host", authority)]
        if proxy.authorization:
            fields.append(("Proxy-Authorization", proxy.authorization))
        writer.write(tunnel.codec.send(h11.Request(method="CONNECT", target=authority, headers=fields)) +
                     tunnel.codec.send(h11.EndOfMessage()))
        while True:
            try:
                event = await _next_event(tunnel, f"{name} ({proxy})", Timeouts(), None)
            except _Stale:
                raise ConnectError(name, f"{proxy} closed the connection instead of answering CONNECT") from None
            if isinstance(event, h11.Response):
                break
        if not 200 <= event.status_code < 300:
            raise ConnectError(name, f"{proxy} answered {event.status_code} {event.reason.decode('latin-1')} to "
                                     f"CONNECT {authority}")
        if tunnel.codec.trailing_data[0]:
            raise ConnectError(name, f"{proxy} sent bytes of its own after its CONNECT answer")

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        self._busy.discard(conn)
        codec = conn.codec
        if reusable and not self._closed and codec.our_state is h11.DONE and codec.their_state is h11.DONE:
            codec.start_next_cycle()
            idle = self._idle.setdefault(conn.origin, [])
            if len(idle) < IDLE_PER_ORIGIN:
                conn.idle_since = asyncio.get_running_loop().time()
                idle.append(conn)
                return
        conn.close()

    async def close(self) -> None:
        """Close every connection, those of answers still being read too (their reads then fail)."""
        self._closed = True
        for conn in [*self._busy, *(c for idle in self._idle.values() for c in idle)]:
            conn.close()
        self._busy.clear()
        self._idle.clear()
