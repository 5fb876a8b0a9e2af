"""hbone.accept.Acceptor on loopback: bursts of connections are all served, each taken by one accept(2) that finds
it, and an accept error is survived."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Any

import pytest

from hbone.accept import Acceptor


async def _answer(conn: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with conn:
        data = await loop.sock_recv(conn, 16)
        await loop.sock_sendall(conn, b"ok:" + data)


async def _call(address: tuple[str, int], n: int) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(str(n).encode())
    answer = await reader.read(64)
    writer.close()
    return answer


async def test_a_burst_of_connections_is_accepted_and_every_one_served() -> None:
    """More connections at once than one wake-up accepts (ACCEPT_BATCH): every one is served, in its own task."""
    acceptor = Acceptor(socket.create_server(("127.0.0.1", 0), backlog=512), _answer, "test")
    acceptor.start()
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(_call(acceptor.address, n) for n in range(300))), 20)
        assert answers == [b"ok:%d" % n for n in range(300)]
    finally:
        await acceptor.close()


class _FailingOnce(socket.socket):
    """A listener whose first accept fails as it would when the process is out of file descriptors."""

    failed = False

    def _accept(self) -> tuple[int, object]:  # what ``accept`` and the Acceptor call
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return super()._accept()  # type: ignore[misc, no-any-return]


class _InfoFailingOnce(socket.socket):
    """A listener whose first getsockopt (the Acceptor's question: how many connections wait) fails."""

    failed = False

    def getsockopt(self, *args: int) -> Any:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return super().getsockopt(*args)


@pytest.mark.parametrize(("kind", "error"), [(_FailingOnce, "[Errno 24] Too many open files"),
                                             (_InfoFailingOnce, "[Errno 105] No buffer space available")])
async def test_an_accept_error_is_logged_and_accepting_resumes(kind: type[socket.socket], error: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    listener = kind(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    acceptor = Acceptor(listener, _answer, "test")
    acceptor.start()
    try:
        with caplog.at_level(logging.ERROR, logger="hbone.accept"):
            assert await asyncio.wait_for(_call(acceptor.address, 1), 10) == b"ok:1"
        assert f"test: accept failed: {error}" in caplog.text
    finally:
        await acceptor.close()


class _Counting(socket.socket):
    """A listener that counts its accepts, and those that found nothing waiting."""

    accepts = 0
    found_none = 0

    def _accept(self) -> tuple[int, object]:
        self.accepts += 1
        try:
            return super()._accept()  # type: ignore[misc, no-any-return]
        except BlockingIOError:
            self.found_none += 1
            raise


async def test_what_waits_is_accepted_without_an_accept_that_finds_nothing() -> None:
    """The kernel says how many connections wait (the listener's tcp_info): a wake-up accepts that many, and makes
    no accept(2) that fails with EAGAIN, which costs several times a successful one in Python."""
    listener = _Counting(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    waiting = [socket.create_connection(listener.getsockname()) for _ in range(5)]  # queued before accepting
    acceptor = Acceptor(listener, _answer, "test")
    acceptor.start()
    try:
        for n, conn in enumerate(waiting):
            conn.sendall(str(n).encode())
        answers = await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(c.recv, 16) for c in waiting)), 10)
        assert answers == [b"ok:%d" % n for n in range(5)]
        assert await asyncio.wait_for(_call(acceptor.address, 5), 10) == b"ok:5"
        assert (listener.accepts, listener.found_none) == (6, 0)
    finally:
        for conn in waiting:
            conn.close()
        await acceptor.close()
