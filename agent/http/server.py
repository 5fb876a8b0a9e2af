"""A small HTTP/1.1 server on asyncio streams for fixed routes: what the admin endpoints need, nothing more.

    server = HttpServer("metrics", {("GET", "/metrics"): handler})
    await server.serve(socket.create_server(("0.0.0.0", 15020)))     # or await server.serve_unix(path)
    ...
    await server.close()

A handler gets a ``Request`` (method, path, query, headers, body) and returns a ``Reply``; a GET route answers
HEAD too (the headers, no body). Keep-alive as HTTP/1.1 says (h11 keeps the rules). An unknown path gets 404, a
known path with another method 405 (with ``Allow``), a handler that raises 500 (logged). A request that is not
HTTP/1.1 (bad request line, bad headers, a header block over ``MAX_HEADERS``, a body over ``MAX_BODY``) gets 400
(413 for the body) naming the problem, and its connection is closed; every other connection is served on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

from agent.http.client import head_size

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(when: float | None = None) -> str:
    """RFC 9110's IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), without email.utils (and the email package
    it brings into the agent)."""
    t = time.gmtime(when)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")

log = logging.getLogger(__name__)

MAX_HEADERS = 16 * 1024  # bytes of a request line and headers
MAX_BODY = 64 * 1024  # bytes of a request body (the admin endpoints take none of any size)
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may wait for its next request
REQUEST_TIMEOUT = 30.0  # seconds a request may take to arrive, once begun
READ_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]  # the last value of each name
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Sequence[tuple[str, str]] = field(default=())


def text_reply(text: str, status: int = 200) -> Reply:
    return Reply(status, text.encode())


def json_reply(value: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(value).encode(), "application/json; charset=utf-8")


Handler = Callable[[Request], Awaitable[Reply]]
Routes = Mapping[tuple[str, str], Handler]  # (method, path) -> handler


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class HttpServer:
    """Serves ``routes`` on any number of listening sockets (see the module docstring)."""

    def __init__(self, name: str, routes: Routes, *, idle_timeout: float = IDLE_TIMEOUT,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.name = name
        self.routes = dict(routes)
        self.idle_timeout, self.request_timeout = idle_timeout, request_timeout
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self.bad_requests = 0  # for tests and logs

    async def serve(self, sock: socket.socket) -> None:
        """Serve on a listening TCP socket."""
        self._servers.append(await asyncio.start_server(self._accepted, sock=sock))

    async def serve_unix(self, path: str) -> None:
        """Serve on a unix socket at ``path`` (an old socket file there is replaced)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._servers.append(await asyncio.start_unix_server(self._accepted, path=path))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._converse(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            self._connections.discard(task)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        codec = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        while True:
            try:
                request = await self._read_request(codec, reader)
            except _BadRequest as e:
                self.bad_requests += 1
                peer = writer.get_extra_info("peername") or "unix socket"
                log.debug("%s: bad request from %s: %s", self.name, peer, e)
                if codec.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await self._send(codec, writer, Reply(e.status, f"bad request: {e}\n".encode()), head=False,
                                     close=True)
                return
            if request is None:
                return  # closed, or idle for too long
            reply = await self._answer(request)
            await self._send(codec, writer, reply, head=request.method == "HEAD", close=False)
            if codec.our_state is not h11.DONE or codec.their_state is not h11.DONE:
                return  # the client asked to close (or HTTP/1.0)
            codec.start_next_cycle()

    async def _read_request(self, codec: h11.Connection, reader: asyncio.StreamReader) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = codec.next_event()
            except h11.RemoteProtocolError as e:
                message = str(e)
                if message == "Receive buffer too long":
                    message = f"request line and headers longer than {MAX_HEADERS} bytes"
                raise _BadRequest(400, message) from None
            if event is h11.NEED_DATA:
                started = head is not None or bool(codec.trailing_data[0])
                try:
                    async with asyncio.timeout(self.request_timeout if started else self.idle_timeout):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    if started:
                        raise _BadRequest(400, f"the request did not arrive within {self.request_timeout:g} s") \
                            from None
                    return None
                codec.receive_data(data)
            elif isinstance(event, h11.Request):
                if head_size(event) + len(event.target) > MAX_HEADERS:  # one that arrived whole in a read
                    raise _BadRequest(400, f"request line and headers longer than {MAX_HEADERS} bytes")
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _BadRequest(413, f"request body longer than {MAX_BODY} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _request(head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _answer(self, request: Request) -> Reply:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((method, request.path))
        if handler is None:
            allowed = sorted({m for m, p in self.routes if p == request.path})
            if not allowed:
                return text_reply("404: Not Found", 404)
            allow = ", ".join(allowed + (["HEAD"] if "GET" in allowed else []))
            return Reply(405, b"405: Method Not Allowed", headers=[("Allow", allow)])
        try:
            return await handler(request)
        except Exception:
            log.exception("%s: %s %s failed", self.name, request.method, request.path)
            return text_reply("500: Internal Server Error", 500)

    @staticmethod
    async def _send(codec: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, *, head: bool,
                    close: bool) -> None:
        fields = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body))),
                  ("Date", http_date()), ("Server", "ambit"), *reply.headers]
        if close:
            fields.append(("Connection", "close"))
        data = codec.send(h11.Response(status_code=reply.status, headers=fields))
        if reply.body and not head:
            data += codec.send(h11.Data(data=reply.body))
        data += codec.send(h11.EndOfMessage())
        writer.write(data)
        await writer.drain()


def _request(head: h11.Request, body: bytes) -> Request:
    target = urlsplit(head.target.decode("latin-1"))
    headers: dict[str, str] = {}
    for key, value in head.headers:
        name, text = key.decode("latin-1"), value.decode("latin-1")
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    return Request(head.method.decode("ascii"), target.path, dict(parse_qsl(target.query)), headers, body)
