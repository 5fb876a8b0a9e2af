"""Pooled HBONE connections, keyed as ztunnel keys them: (source identity, destination identity, destination
address, source IP).

A connection carries at most ``max_streams`` streams (100, or fewer if the server allows fewer); the
next stream opens a new connection. Streams are assigned synchronously, so a burst of requests for one
key fills the connection being dialled instead of dialling one connection each. A connection with no
stream for ``idle_timeout`` seconds is closed. A stream the server refused unprocessed is retried once
on a fresh connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from hbone.addresses import Address
from hbone.authority import Authority
from hbone.client import ClientTunnel, Dialer, StreamRefused, open_tunnel
from hbone.deadline import Deadline
from hbone.identity import SpiffeId, TrustBundle, WorkloadCertificate
from hbone.protocol import Settings
from hbone.sockets import dial
from hbone.tunnel import StreamHandler, Tunnel

log = logging.getLogger(__name__)



class PoolKey(NamedTuple):
    """A tuple: hashed and compared in C, where a dataclass's ``__hash__`` and ``__eq__`` run in Python."""

    source: SpiffeId
    destination: SpiffeId
    address: Address
    source_ip: str | None = None  # the tunnel's L3 source, when the agent sends as the client pod


@dataclass(eq=False)
class _Entry:
    key: PoolKey
    dial: asyncio.Task[ClientTunnel]
    assigned: int = 0  # streams given to this connection and not yet finished
    dead: bool = False
    idle: Deadline | None = field(default=None, repr=False)  # counting while no stream is assigned


class Pool:
    def __init__(self, bundle: TrustBundle | Callable[[], TrustBundle], settings: Settings = Settings(), *,
                 max_streams: int = 100, idle_timeout: float = 300.0, connect_timeout: float = 10.0,
                 dial: Dialer = dial) -> None:
        self._bundle = bundle
        self.dial = dial
        self.settings = settings
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._entries: dict[PoolKey, list[_Entry]] = {}

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle() if callable(self._bundle) else self._bundle

    def connections(self, key: PoolKey | None = None) -> int:
        keys = [key] if key is not None else list(self._entries)
        return sum(1 for k in keys for e in self._entries.get(k, []) if not e.dead)

    async def connect(self, relay: StreamHandler, source: WorkloadCertificate, destination: SpiffeId, address: Address,
                      authority: Authority, headers: Mapping[str, str], source_ip: str | None = None) -> None:
        """Open a CONNECT stream for ``relay``; returns once the server answered 200 and the relay runs.

        Raises HboneError (StreamFailed carries the status) if the tunnel or the stream cannot be had.
        """
        key = PoolKey(source.identity, destination, address, source_ip)
        for attempt in (1, 2):
            entry = self._checkout(key, source)
            try:
                dial = entry.dial
                # A dialled connection (the usual case) is used at once: no shield future, no task switch.
                tunnel = dial.result() if dial.done() else await asyncio.shield(dial)
                await tunnel.open(relay, authority, headers)
                return
            except StreamRefused as e:
                self._release(entry)
                entry.dead = True
                if attempt == 2:
                    raise
                log.debug("stream refused on %s (%s); retrying on a new connection", key, e)
            except BaseException:
                self._release(entry)
                raise

    def _checkout(self, key: PoolKey, source: WorkloadCertificate) -> _Entry:
        entries = self._entries.setdefault(key, [])
        for entry in entries:
            if not entry.dead and entry.assigned < self._limit(entry):
                break
        else:
            dial = asyncio.ensure_future(self._dial(key, source))
            entry = _Entry(key, dial)
            entries.append(entry)
            dial.add_done_callback(lambda t, e=entry: self._dialled(e, t))  # type: ignore[misc]
        entry.assigned += 1
        if entry.idle is not None:
            entry.idle.stop()
        return entry

    def _limit(self, entry: _Entry) -> int:
        if entry.dial.done() and not entry.dial.cancelled() and entry.dial.exception() is None:
            return min(self.max_streams, entry.dial.result().stream_limit)
        return self.max_streams

    async def _dial(self, key: PoolKey, source: WorkloadCertificate) -> ClientTunnel:
        return await open_tunnel(key.address, source, key.destination, self.bundle, self.settings,
                                 self.connect_timeout, self.dial, key.source_ip)

    def _dialled(self, entry: _Entry, task: asyncio.Task[ClientTunnel]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._drop(entry)
            return
        tunnel = task.result()
        tunnel.on_stream_closed = lambda _t: self._release(entry)
        tunnel.on_lost = lambda _t: self._drop(entry)

    def _release(self, entry: _Entry) -> None:
        entry.assigned -= 1
        if entry.assigned:
            return
        if entry.dead:  # refused or lost: close it once its last stream is done
            self._drop(entry)
            return
        if entry.idle is None:
            entry.idle = Deadline(entry.dial.get_loop(), self.idle_timeout, lambda: self._expire(entry))
        entry.idle.start()

    def _expire(self, entry: _Entry) -> None:
        log.debug("closing idle HBONE connection %s", entry.key)
        self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        entry.dead = True
        if entry.idle is not None:
            entry.idle.cancel()
        entries = self._entries.get(entry.key, [])
        if entry in entries:
            entries.remove(entry)
            if not entries:
                del self._entries[entry.key]
        if entry.dial.done() and not entry.dial.cancelled() and entry.dial.exception() is None:
            tunnel: Tunnel = entry.dial.result()
            tunnel.on_lost = None
            tunnel.close()

    async def close(self) -> None:
        for entries in list(self._entries.values()):
            for entry in list(entries):
                if not entry.dial.done():
                    entry.dial.cancel()
                    with contextlib.suppress(BaseException):
                        await entry.dial
                self._drop(entry)
