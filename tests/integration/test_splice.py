"""The agent's TCP-to-TCP splice, a relay's TCP side and the connection table, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agent.proxy.connections import ConnectionTable
from agent.proxy.splice import Splice
from hbone import Relay
from tests.fixtures.eventually import eventually

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _accepted_pair() -> tuple[socket.socket, asyncio.StreamReader, asyncio.StreamWriter]:
    """A connected pair: our end as a raw accepted socket, the client's end as streams."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = asyncio.ensure_future(asyncio.open_connection(*listener.getsockname()[:2], limit=1 << 22))
    sock, _ = await loop.sock_accept(listener)
    listener.close()
    reader, writer = await client
    return sock, reader, writer


@contextlib.asynccontextmanager
async def _splice_to(handler: Handler, table: ConnectionTable | None = None
                     ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter, Splice]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    upstream = socket.create_connection(server.sockets[0].getsockname()[:2])
    upstream.setblocking(False)
    sock, reader, writer = await _accepted_pair()
    splice = Splice()
    await splice.join(sock, upstream)
    if table is not None:
        table.watch("passthrough", ("10.0.0.1",), splice)
    try:
        yield reader, writer, splice
    finally:
        writer.close()
        server.close()


async def test_bytes_cross_exactly_and_half_close_works() -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        writer.write(hashlib.sha256(data).digest() + data[::-1])
        writer.write_eof()
        writer.close()

    payload = os.urandom(8 << 20)
    async with _splice_to(reply_after_eof) as (reader, writer, splice):
        writer.write(payload)
        writer.write_eof()
        back = await asyncio.wait_for(reader.read(-1), 10)
        assert back[:32] == hashlib.sha256(payload).digest()
        assert back[32:] == payload[::-1]
        await eventually(lambda: splice.closed, "the splice closed")
        assert splice.closed and splice.bytes_up == len(payload) and splice.bytes_down == len(back)


async def test_upstream_reset_reaches_the_client_as_reset() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with _splice_to(reset) as (reader, writer, splice):
        writer.write(b"x")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        await eventually(lambda: splice.closed, "the splice closed")
        assert splice.reason == "reset"


async def test_release_resets_a_pods_connections() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)

    table = ConnectionTable()
    async with _splice_to(hold, table) as (reader, _, splice):
        assert table.count("10.0.0.1") == 1
        assert table.release("10.0.0.1") == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        await eventually(lambda: splice.closed, "the splice closed")
        assert splice.closed and table.count() == 0


async def test_an_upstream_reset_before_the_splice_joins_reaches_the_client_as_reset() -> None:
    """The upstream is reset before the client's side has a transport (the pod refused while the proxy was still
    joining): the client is reset all the same, without having to send anything first."""
    reset_sent = asyncio.Event()

    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        reset_sent.set()

    server = await asyncio.start_server(reset_at_once, "127.0.0.1", 0)
    upstream = socket.create_connection(server.sockets[0].getsockname()[:2])
    upstream.setblocking(False)
    await asyncio.wait_for(reset_sent.wait(), 5)
    await asyncio.sleep(0.05)  # the RST is in: the upstream's first read will fail
    sock, reader, writer = await _accepted_pair()
    splice = Splice()
    try:
        await splice.join(sock, upstream)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(-1), 5)
        await eventually(lambda: splice.closed and splice.client.lost, "the splice closed, both sides lost")
    finally:
        writer.close()
        server.close()


async def test_a_stream_reset_before_the_relay_has_its_tcp_side_resets_it_when_it_comes() -> None:
    """An outbound relay's stream can be reset between the CONNECT's 200 and the moment its client's socket
    becomes a transport: the client is reset then, not left open with nothing behind it."""
    relay = Relay()
    relay.on_reset("stream reset by peer (code 8)")  # before any TCP side
    assert relay.closed
    sock, reader, writer = await _accepted_pair()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: relay, sock)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
