"""The agent's drain: accept no more, let what is open finish (bounded)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.proxy.connections import ConnectionTable
from hbone.accept import Acceptor


async def test_stopped_acceptor_refuses_new_connections_and_finishes_the_open_ones() -> None:
    release = asyncio.Event()
    finished: list[bool] = []

    async def handle(sock: socket.socket) -> None:
        await release.wait()
        sock.close()
        finished.append(True)

    acceptor = Acceptor(socket.create_server(("127.0.0.1", 0)), handle, "test")
    acceptor.start()
    address = acceptor.address
    _, writer = await asyncio.open_connection(*address)
    await asyncio.sleep(0.05)
    await acceptor.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(*address)
    release.set()
    await asyncio.sleep(0.05)
    assert finished == [True]  # the connection accepted before the stop was served to its end
    writer.close()
    await acceptor.close()


async def test_wait_empty_returns_when_the_last_connection_closes_or_at_the_deadline() -> None:
    table = ConnectionTable()
    assert await table.wait_empty(0.01) == 0
    first = table.open("passthrough", ("10.0.0.1",), lambda: None)
    second = table.open("passthrough", ("10.0.0.2",), lambda: None)
    assert await table.wait_empty(0.05) == 2  # deadline: both still open
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, table.close, first)
    loop.call_later(0.10, table.close, second)
    started = loop.time()
    assert await table.wait_empty(5) == 0
    assert loop.time() - started < 1  # woken by the close, not the deadline
    third = table.open("passthrough", ("10.0.0.3",), lambda: None)  # emptied once: a later wait waits again
    assert await table.wait_empty(0.05) == 1
    loop.call_later(0.05, table.close, third)
    assert await table.wait_empty(5) == 0
