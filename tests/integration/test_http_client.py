"""agent/http's client against a scripted server on loopback: keep-alive, chunked and Content-Length bodies,
lines, and every kind of bad answer, each an error naming the request and where in the answer it went wrong."""

from __future__ import annotations

import asyncio
import re

import pytest

from agent.http import ConnectError, HttpClient, HttpTimeout, LineTooLong, ProtocolError, Timeouts
from agent.http.client import MAX_HEADERS
from tests.fixtures.hostile_http import Answer, HostileServer, SeenRequest, chunked, reply

T = Timeouts(total=5)


def always(data: bytes, keep: bool = True) -> Answer:
    async def answer(request: SeenRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        return keep
    return answer


async def get(url: str, *, method: str = "GET", timeouts: Timeouts = T, client: HttpClient | None = None,
              body: bytes | None = None) -> tuple[int, bytes]:
    own = client is None
    client = client or HttpClient()
    try:
        async with await client.request(method, url, timeouts=timeouts, body=body) as response:
            return response.status, await response.read()
    finally:
        if own:
            await client.close()


async def test_keep_alive_reuses_one_connection_and_sends_what_it_should() -> None:
    async with HostileServer(always(reply("200 OK", b"hello"))) as server:
        client = HttpClient()
        try:
            for _ in range(3):
                assert await get(server.url + "/a?x=1", client=client) == (200, b"hello")
            assert await get(server.url + "/b", method="POST", body=b'{"k": 1}', client=client) == (200, b"hello")
        finally:
            await client.close()
        assert server.connections == 1 and client.connections_opened == 1
        assert [(r.connection, r.method, r.target) for r in server.requests] == [
            (0, "GET", "/a?x=1"), (0, "GET", "/a?x=1"), (0, "GET", "/a?x=1"), (0, "POST", "/b")]
        assert server.requests[0].headers["host"] == server.url.removeprefix("http://")
        assert server.requests[-1].body == b'{"k": 1}' and server.requests[-1].headers["content-length"] == "8"


async def test_chunked_lines_split_anywhere_and_a_last_line_without_newline() -> None:
    events = [b'{"a":1}\n{"b"', b':2}\n\n', b'{"c":3}\n{"d":4}']
    async with HostileServer(always(chunked("200 OK", *events))) as server:
        client = HttpClient()
        try:
            async with await client.request("GET", server.url + "/w", timeouts=T) as response:
                assert [line async for line in response.lines(100)] == [b'{"a":1}', b'{"b":2}', b"", b'{"c":3}',
                                                                        b'{"d":4}']
            assert await get(server.url + "/again", client=client) == (200, b"".join(events))
        finally:
            await client.close()
        assert server.connections == 1  # the chunked answer read to its end left the connection reusable


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    async with HostileServer(always(reply("200 OK", b"x" * 1000))) as server:
        client = HttpClient()
        try:
            async with await client.request("GET", server.url + "/big", timeouts=T) as response:
                assert response.status == 200
            assert await get(server.url + "/next", client=client) == (200, b"x" * 1000)
        finally:
            await client.close()
        assert server.connections == 2


BAD_ANSWERS = {
    "bad status line": (b"HTTP/1.1 OK-ish\r\n\r\n", r"malformed answer: illegal status line: .*OK-ish"),
    "not HTTP": (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", r"malformed answer: illegal status line: .*SSH-2\.0"),
    "bad header": (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", r"malformed answer: illegal header line: .*no colon"),
    "bad chunk size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\nxx\r\n0\r\n\r\n",
                       r"malformed answer: illegal chunk header: .*zz.*, after 3 bytes of the body"),
    "oversized headers": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEADERS + 10) + b"\r\n\r\n",
                          rf"malformed answer: a header block .* longer than {MAX_HEADERS} bytes"),
    "truncated body": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
                       r"malformed answer: peer closed connection without sending complete message body "
                       r"\(received 5 bytes, expected 10\), after 5 bytes of the body"),
    "truncated chunked body": (chunked("200 OK", b"hello", end=False),
                               r"malformed answer: peer closed connection without sending complete message body "
                               r"\(incomplete chunked read\), after 5 bytes of the body"),
    "truncated headers": (b"HTTP/1.1 200 OK\r\nContent-Le", r"malformed answer: peer unexpectedly closed"),
    "two lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                    r"malformed answer: conflicting Content-Length headers"),
}


@pytest.mark.parametrize("case", BAD_ANSWERS)
async def test_a_bad_answer_is_an_error_naming_the_request_and_where(case: str) -> None:
    data, message = BAD_ANSWERS[case]
    async with HostileServer(always(data, keep=False)) as server:
        url = server.url + "/api/v1/pods?watch=true"
        with pytest.raises(ProtocolError, match=f"^GET {re.escape(url)}: {message}"):
            await get(url)


async def test_a_line_over_the_bound_is_named_with_its_place() -> None:
    async with HostileServer(always(chunked("200 OK", b"short\n", b"x" * 300, b"\n"))) as server:
        client = HttpClient()
        try:
            async with await client.request("GET", server.url + "/w", timeouts=T) as response:
                seen = []
                with pytest.raises(LineTooLong, match=r"/w: a line longer than 256 bytes starts at byte 6 "):
                    async for line in response.lines(256):
                        seen.append(line)
                assert seen == [b"short"]
        finally:
            await client.close()


async def test_read_has_a_bound() -> None:
    async with HostileServer(always(reply("200 OK", b"x" * 5000))) as server:
        client = HttpClient()
        try:
            async with await client.request("GET", server.url + "/big", timeouts=T) as response:
                with pytest.raises(ProtocolError, match=r"/big: the body is longer than 1000 bytes"):
                    await response.read(limit=1000)
        finally:
            await client.close()


async def test_timeouts_name_the_request_and_are_timeout_errors() -> None:
    async def silent(request: SeenRequest, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(10)
        return False

    async def stalls(request: SeenRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nsome")
        await writer.drain()
        await asyncio.sleep(10)
        return False

    async with HostileServer(silent) as server:
        with pytest.raises(HttpTimeout, match=rf"^GET {re.escape(server.url)}/slow: no answer within the request's "):
            await get(server.url + "/slow", timeouts=Timeouts(total=0.2))
    async with HostileServer(stalls) as server:
        with pytest.raises(TimeoutError, match=r"/stall: the answer stopped after \d+ bytes, for 0.2 s"):
            await get(server.url + "/stall", timeouts=Timeouts(total=5, read=0.2))


async def test_a_pooled_connection_closed_by_the_server_is_retried_only_when_idempotent() -> None:
    # The server answers, keeps nothing, and closes: the pooled connection is stale by the next request.
    async def answer_then_close(request: SeenRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply("200 OK", request.method.encode()))
        return False

    async with HostileServer(answer_then_close) as server:
        client = HttpClient()
        try:
            assert await get(server.url + "/1", client=client) == (200, b"GET")
            await asyncio.sleep(0.05)
            assert await get(server.url + "/2", client=client) == (200, b"GET")  # EOF seen: not reused at all
            assert client.connections_opened == 2
        finally:
            await client.close()

    async def keeps_then_drops(request: SeenRequest, writer: asyncio.StreamWriter) -> bool:
        if request.connection == 0 and len([r for r in server.requests if r.connection == 0]) > 1:
            writer.transport.abort()  # the server dropped it idle, just as the request arrived
            return False
        writer.write(reply("200 OK", b"ok"))
        return True

    for method, idempotent, outcome in (("GET", None, "retried"), ("POST", None, "error"), ("POST", True, "retried")):
        async with HostileServer(keeps_then_drops) as server:
            client = HttpClient()
            try:
                assert await get(server.url + "/1", client=client) == (200, b"ok")
                request = client.request(method, server.url + "/2", timeouts=T, idempotent=idempotent)
                if outcome == "retried":
                    async with await request as response:
                        assert response.status == 200
                    assert server.connections == 2
                else:
                    with pytest.raises(ConnectError, match=r"^POST .*/2: the server closed the connection without "):
                        await request
            finally:
                await client.close()


async def test_connection_refused_names_the_request() -> None:
    async with HostileServer(always(b"")) as server:
        url = server.url
    with pytest.raises(ConnectError, match=rf"^GET {re.escape(url)}/x: cannot connect to 127\.0\.0\.1:\d+: "):
        await get(url + "/x")


async def test_closing_the_client_ends_an_answer_being_streamed() -> None:
    async def endless(request: SeenRequest, writer: asyncio.StreamWriter) -> bool:
        writer.write(chunked("200 OK", b'{"a":1}\n', end=False))
        await writer.drain()
        await asyncio.sleep(30)
        return False

    async with HostileServer(endless) as server:
        client = HttpClient()
        response = await client.request("GET", server.url + "/watch", timeouts=Timeouts(connect=5))
        seen: list[bytes] = []

        async def consume() -> None:
            async with response:
                async for line in response.lines(100):
                    seen.append(line)

        reader = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        assert seen == [b'{"a":1}']
        await client.close()
        with pytest.raises(ConnectError, match=r"/watch: closed by this side after \d+ bytes of the answer"):
            await asyncio.wait_for(reader, 2)
        with pytest.raises(ConnectError, match=r"/again: the client is closed"):
            await client.request("GET", server.url + "/again", timeouts=T)
