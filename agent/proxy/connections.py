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

from agent.telemetry.recorder import FlowHandle


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
    """A connection in the table: the local pods it serves, how to abort it, and (``watch``) the flows that end with
    it and the close handler it replaced. One slotted object per connection, its ``closed`` the connection's close
    handler: no closure, no dataclass."""

    __slots__ = ("_previous", "_table", "abort", "flows", "kind", "pods", "server_side")

    def __init__(self, table: ConnectionTable, kind: str, pods: tuple[str, ...], abort: Callable[[], None],
                 flows: tuple[FlowHandle | None, ...] = (), server_side: bool = False,
                 previous: Callable[[Any, str], None] | None = None) -> None:
        self.kind = kind  # outbound-hbone, outbound-local, passthrough, inbound-hbone, inbound-plaintext
        self.pods = pods  # IPs of the local pods the connection serves
        self.abort = abort
        self.flows, self.server_side = flows, server_side
        self._table, self._previous = table, previous

    def __repr__(self) -> str:
        return f"Tracked({self.kind!r}, {self.pods!r})"

    def closed(self, conn: Proxied, reason: str) -> None:
        """The connection closed: out of the table, its flows ended, then the handler it replaced."""
        self._table.close(self)
        self.end_flows(conn, reason)
        if self._previous is not None:
            self._previous(conn, reason)

    def end_flows(self, conn: Proxied, reason: str) -> None:
        """End the flows (None: telemetry off) with the bytes ``conn`` moved each way and why it closed; with
        ``server_side``, ``conn``'s TCP end is the server pod (an inbound HBONE relay): its bytes "up" are the
        response."""
        request, response = (conn.bytes_down, conn.bytes_up) if self.server_side else (conn.bytes_up, conn.bytes_down)
        failed = reason != "closed"
        for flow in self.flows:
            if flow is not None:
                flow.end(request, response, reason, error=failed)


class ConnectionTable:
    def __init__(self) -> None:
        self._by_pod: dict[str, set[Tracked]] = {}
        self._emptied: asyncio.Event | None = None  # while someone waits for the table to empty

    def open(self, kind: str, pods: tuple[str, ...], abort: Callable[[], None]) -> Tracked:
        return self._add(Tracked(self, kind, pods, abort))

    def _add(self, tracked: Tracked) -> Tracked:
        for ip in tracked.pods:
            entries = self._by_pod.get(ip)
            if entries is None:
                entries = self._by_pod[ip] = set()
            entries.add(tracked)
        return tracked

    def watch(self, kind: str, pods: tuple[str, ...], conn: Proxied, flows: tuple[FlowHandle | None, ...] = (),
              server_side: bool = False) -> None:
        """Until ``conn`` closes: in the table (a released pod's connections are reset); when it closes, its
        ``flows`` (None: telemetry off) end with the bytes moved each way and why it closed. ``server_side``:
        ``conn``'s TCP end is the server pod (an inbound HBONE relay), so its bytes "up" are the response."""
        if conn.closed:
            Tracked(self, kind, pods, conn.abort, flows, server_side).end_flows(conn, "closed")
            return
        conn.on_close = self._add(Tracked(self, kind, pods, conn.abort, flows, server_side, conn.on_close)).closed

    def close(self, tracked: Tracked) -> None:
        for ip in tracked.pods:
            entries = self._by_pod.get(ip)
            if entries is not None:
                entries.discard(tracked)
                if not entries:
                    del self._by_pod[ip]
        if self._emptied is not None and not self._by_pod:
            self._emptied.set()  # (its waiters hold it; the next wait makes another)
            self._emptied = None

    def count(self, pod_ip: str | None = None) -> int:
        if pod_ip is not None:
            return len(self._by_pod.get(pod_ip, ()))
        return len({t for entries in self._by_pod.values() for t in entries})

    async def wait_empty(self, within: float) -> int:
        """Wait (at most ``within`` seconds) until no connection is left; returns how many are."""
        if self._by_pod:
            emptied = self._emptied = self._emptied or asyncio.Event()  # (``close`` sets it)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await emptied.wait()
        return self.count()

    def release(self, pod_ip: str) -> int:
        """Reset every connection proxied for ``pod_ip``; returns how many."""
        entries = list(self._by_pod.get(pod_ip, ()))
        for tracked in entries:
            self.close(tracked)
            tracked.abort()
        return len(entries)
