"""Accepting on a listening socket ourselves, one tracked task per connection.

Used instead of ``create_server`` where the handler must see the accepted socket before any transport
exists: its local address decides the certificate (HBONE server) or the route (the agent's proxies),
and until a transport is made the kernel, not a protocol object, holds what the client sends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from hbone.sockets import FixedKindSocket

log = logging.getLogger(__name__)


ACCEPT_BATCH = 64  # connections accepted per wake-up at most: the loop's other work gets its turn between batches
ACCEPT_PAUSE = 0.1  # seconds without accepting after an accept error (EMFILE and friends)
# A listener's ``tcp_info`` counts the connections waiting for accept(2) in ``tcpi_unacked`` (Linux aliases the field
# for listeners): the u32 at offset 24. One getsockopt(2) there costs ~0.8 us; the accept(2) that finds none, as a
# loop that accepts until EAGAIN makes on every wake-up, costs ~6 us (a BlockingIOError: its text, its traceback).
_TCP_INFO_READ = 32
_WAITING = struct.Struct("=24xI")


class Acceptor:
    """Accepts from a reader callback on the listener, every connection waiting (up to ``ACCEPT_BATCH``) per
    wake-up: no future, no reader added and removed per connection as ``loop.sock_accept`` does, and one wake-up
    for a burst of connections. How many wait is asked of the kernel, not found by accepting until EAGAIN."""

    def __init__(self, listener: socket.socket, handle: Callable[[socket.socket], Coroutine[Any, Any, None]],
                 name: str) -> None:
        listener.setblocking(False)
        self.listener, self.handle, self.name = listener, handle, name
        # What ``socket.accept`` looks up on every call, as IntEnum conversions in Python: looked up once.
        self._family, self._type, self._proto = listener.family, listener.type, listener.proto
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # while accepting
        self._tasks_loop: asyncio.AbstractEventLoop | None = None  # where the handlers run (also after ``stop``)
        self._resume: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        name = self.listener.getsockname()
        return name[0], name[1]

    def start(self) -> None:
        self._loop = self._tasks_loop = asyncio.get_running_loop()
        self._loop.add_reader(self.listener.fileno(), self._accept)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        loop = self._tasks_loop or asyncio.get_running_loop()  # not looked up per connection (getpid(2) in 3.11)
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: connection handler failed", self.name, exc_info=task.exception())

    def _accept(self) -> None:
        try:
            info = self.listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_READ)
        except OSError as e:
            self._pause(e)
            return
        for _ in range(min(max(_WAITING.unpack_from(info)[0], 1), ACCEPT_BATCH)):  # at least the one that woke us
            try:
                # ``socket.accept`` without its Python-level cost: what it does, with the kind looked up once.
                fd, _ = self.listener._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._pause(e)
                return
            conn = FixedKindSocket.of(self._family, self._type, self._proto, fd)
            conn.setblocking(False)
            self.spawn(self.handle(conn))

    def _pause(self, e: OSError) -> None:
        """Accepting failed (EMFILE and friends): say so, breathe, keep accepting."""
        log.error("%s: accept failed: %s", self.name, e)
        assert self._loop is not None
        self._loop.remove_reader(self.listener.fileno())
        self._resume = self._loop.call_later(ACCEPT_PAUSE, self.start)

    def _stop_accepting(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._loop is not None and self.listener.fileno() >= 0:
            self._loop.remove_reader(self.listener.fileno())
        self._loop = None

    async def stop(self) -> None:
        """Accept no more (the listener closes); connections being handled carry on."""
        self._stop_accepting()
        self.listener.close()

    async def close(self) -> None:
        await self.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
