"""hbone.sockets.dial on loopback, on uvloop (the agent's loop): connected without a thread, errors named."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from hbone.sockets import dial


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


async def test_dial_connects_on_the_loop_without_a_resolver_thread() -> None:
    """uvloop's sock_connect resolves even an IP literal on its thread pool; dial must not (it runs on every
    upstream connection of the inbound proxy): many dials, the same threads before and after."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        before = _threads()
        loop = asyncio.get_running_loop()
        for _ in range(20):
            sock = await asyncio.wait_for(dial(("127.0.0.1", port), "127.0.0.1"), 5)
            accepted, peer = await asyncio.wait_for(loop.sock_accept(server), 5)
            assert peer == sock.getsockname() and sock.getpeername() == ("127.0.0.1", port)
            sock.sendall(b"x")
            assert accepted.recv(1) == b"x"
            accepted.close()
            sock.close()
        assert _threads() == before


async def test_dial_to_a_closed_port_raises_connection_refused_naming_the_address() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections to it are refused
        with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1 port {port}"):
            await asyncio.wait_for(dial(("127.0.0.1", port)), 5)


async def test_a_cancelled_dial_leaves_the_loop_clean() -> None:
    """A dial cancelled while connecting (a timeout) closes its socket and leaves no writer behind."""
    with socket.create_server(("127.0.0.1", 0), backlog=1) as server:
        port = server.getsockname()[1]
        task = asyncio.ensure_future(dial(("127.0.0.1", port)))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        sock = await asyncio.wait_for(dial(("127.0.0.1", port)), 5)  # the loop still dials
        sock.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_dialled_socket_says_its_kind_as_a_socket_does_and_carries_a_transport(host: str) -> None:
    """The socket's family and type are stored, not worked out on each read: the same values, and uvloop makes a
    transport of it (it reads them) that carries bytes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as server:
        server.setblocking(False)
        loop = asyncio.get_running_loop()
        sock = await asyncio.wait_for(dial((host, server.getsockname()[1])), 5)
        with socket.socket(family, socket.SOCK_STREAM) as plain:
            assert (sock.family, sock.type) == (plain.family, plain.type) == (family, socket.SOCK_STREAM)
        accepted, _ = await asyncio.wait_for(loop.sock_accept(server), 5)
        _reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"ping")
        assert await asyncio.wait_for(loop.sock_recv(accepted, 4), 5) == b"ping"
        writer.close()
        accepted.close()


async def test_a_handshake_over_within_connect_is_not_waited_for() -> None:
    """Over loopback (as through a pod's veth) the kernel completes the handshake inside connect(): dial returns
    on its first step, never suspending on the loop (no writer added and removed, no task switch)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        step = dial(("127.0.0.1", server.getsockname()[1]), "127.0.0.1")
        with pytest.raises(StopIteration) as done:
            step.send(None)
        sock = done.value.value
        assert sock.getpeername() == server.getsockname()
        sock.close()


async def test_a_handshake_still_going_on_is_waited_for_on_the_loop() -> None:
    """A listener whose queue is full drops the SYN: the dial waits (writable, on the loop) until the retried SYN
    is answered once the queue has room again."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as server:
        address = server.getsockname()
        queued = [socket.create_connection(address, timeout=5)]  # fills the queue (backlog 0 holds one)
        try:
            task = asyncio.ensure_future(dial(address))
            await asyncio.sleep(0.3)
            assert not task.done()  # SYN_SENT: waiting on the loop
            server.accept()[0].close()  # room again: the SYN retried after ~1 s is answered
            sock = await asyncio.wait_for(task, 5)
            assert sock.getpeername() == address
            sock.close()
        finally:
            for q in queued:
                q.close()
