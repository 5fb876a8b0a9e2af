"""Accepting on a listening socket ourselves, one tracked task per connection.

Used instead of ``create_server`` where the handler must see the accepted socket before any transport
exists: its local address decides the certificate (HBONE server) or the route (the agent's proxies),
and until a transport is made the kernel, not a protocol object, holds what the client sends.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Acceptor:
    def __init__(self, listener: socket.socket, handle: Callable[[socket.socket], Coroutine[Any, Any, None]],
                 name: str) -> None:
        listener.setblocking(False)
        self.listener, self.handle, self.name = listener, handle, name
        self._tasks: set[asyncio.Future[Any]] = set()
        self._loop: asyncio.Task[None] | None = None

    @property
    def address(self) -> tuple[str, int]:
        name = self.listener.getsockname()
        return name[0], name[1]

    def start(self) -> None:
        self._loop = asyncio.ensure_future(self._accept_forever())

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: connection handler failed", self.name, exc_info=task.exception())

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.listener)
            except OSError as e:  # EMFILE and friends: say so, breathe, keep accepting
                log.error("%s: accept failed: %s", self.name, e)
                await asyncio.sleep(0.1)
                continue
            self.spawn(self.handle(conn))

    async def stop(self) -> None:
        """Accept no more (the listener closes); connections being handled carry on."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        self.listener.close()

    async def close(self) -> None:
        await self.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
