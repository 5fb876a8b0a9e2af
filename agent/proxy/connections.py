"""The connections the agent proxies, by the local pods they serve.

When a pod leaves the mesh the programs stop steering its packets, so the connections proxied for it
cannot go on: ``release`` resets them at once instead of leaving sockets to time out. Each proxy
registers a connection when its route is ready and unregisters it when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol


class Proxied(Protocol):
    """A relay or a splice: knows whether it is closed, can be aborted, reports its close."""

    closed: bool
    on_close: Callable[[Any, str], None] | None

    @property
    def bytes_up(self) -> int: ...  # client -> server

    @property
    def bytes_down(self) -> int: ...

    def abort(self) -> None: ...


class Tracked:
    """A connection in the table: the local pods it serves and how to abort it; with ``watch``, its close
    handler too (a slotted object, not a dataclass and closures: one is made per connection)."""

    __slots__ = ("_previous", "_table", "_then", "abort", "kind", "pods")

    def __init__(self, table: ConnectionTable, kind: str, pods: tuple[str, ...], abort: Callable[[], None],
                 then: Callable[[Proxied, str], None] | None = None,
                 previous: Callable[[Any, str], None] | None = None) -> None:
        self.kind = kind  # outbound-hbone, outbound-local, passthrough, inbound-hbone, inbound-plaintext
        self.pods = pods  # IPs of the local pods the connection serves
        self.abort = abort
        self._table, self._then, self._previous = table, then, previous

    def __repr__(self) -> str:
        return f"Tracked({self.kind!r}, {self.pods!r})"

    def closed(self, conn: Any, reason: str) -> None:
        """The connection closed: out of the table, then ``watch``'s ``then`` and the handler it replaced."""
        self._table.close(self)
        if self._then is not None:
            self._then(conn, reason)
        if self._previous is not None:
            self._previous(conn, reason)


class ConnectionTable:
    def __init__(self) -> None:
        self._by_pod: dict[str, set[Tracked]] = {}
        self._empty = asyncio.Event()
        self._empty.set()

    def open(self, kind: str, pods: tuple[str, ...], abort: Callable[[], None]) -> Tracked:
        return self._add(Tracked(self, kind, pods, abort))

    def _add(self, tracked: Tracked) -> Tracked:
        for ip in tracked.pods:
            entries = self._by_pod.get(ip)
            if entries is None:
                entries = self._by_pod[ip] = set()
            entries.add(tracked)
        if self._by_pod:
            self._empty.clear()
        return tracked

    def watch(self, kind: str, pods: tuple[str, ...], conn: Proxied,
              then: Callable[[Proxied, str], None] | None = None) -> None:
        """Track ``conn`` until it closes, then call ``then(conn, reason)``."""
        if conn.closed:
            if then is not None:
                then(conn, "closed")
            return
        conn.on_close = self._add(Tracked(self, kind, pods, conn.abort, then, conn.on_close)).closed

    def close(self, tracked: Tracked) -> None:
        for ip in tracked.pods:
            entries = self._by_pod.get(ip)
            if entries is not None:
                entries.discard(tracked)
                if not entries:
                    del self._by_pod[ip]
        if not self._by_pod:
            self._empty.set()

    def count(self, pod_ip: str | None = None) -> int:
        if pod_ip is not None:
            return len(self._by_pod.get(pod_ip, ()))
        return len({t for entries in self._by_pod.values() for t in entries})

    async def wait_empty(self, within: float) -> int:
        """Wait (at most ``within`` seconds) until no connection is left; returns how many are."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._empty.wait()
        return self.count()

    def release(self, pod_ip: str) -> int:
        """Reset every connection proxied for ``pod_ip``; returns how many."""
        entries = list(self._by_pod.get(pod_ip, ()))
        for tracked in entries:
            self.close(tracked)
            tracked.abort()
        return len(entries)
