"""TCP to TCP, both ways: for connections that leave the mesh (passthrough) or stay on the node.

Back-pressure: a side whose peer cannot take more (peer transport over its high-water mark) stops
reading. FIN crosses as FIN (half-close), a reset as a reset.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

from hbone import TCP_WRITE_HIGH_WATER, abort_with_reset


class _Side(asyncio.Protocol):
    def __init__(self, splice: Splice) -> None:
        self.splice: Splice | None = splice  # None once the splice is over (``Splice.finish``)
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []  # read before the peer existed
        self.eof = False
        self.lost = False
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=TCP_WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            self.held.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
            return
        if not peer.transport.is_closing():  # (else the peer is gone, and this side is being told so)
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if (peer is not None and peer.transport is not None and not peer.transport.is_closing()
                and peer.transport.can_write_eof()):
            peer.transport.write_eof()
        if self.splice is not None:
            self.splice.maybe_done()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.eof:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is not None:
                abort_with_reset(peer.transport)
            elif not self.eof:
                peer.transport.close()
        splice = self.splice
        if splice is None:
            return
        if exc is not None:
            splice.reason = "reset"
        if peer is None or peer.lost or peer.transport is None or splice.closed:
            splice.finish(splice.reason)


class Splice:
    """Two TCP connections joined. ``on_close(splice, reason)`` runs once when both are done."""

    def __init__(self, on_close: Callable[[Splice, str], None] | None = None) -> None:
        self.client = _Side(self)
        self.upstream = _Side(self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.on_close = on_close
        self.closed = False
        self.reason = "closed"

    async def join(self, client: socket.socket, upstream: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: self.upstream, upstream)
        await loop.connect_accepted_socket(lambda: self.client, client)
        for side in (self.client, self.upstream):
            held, side.held = side.held, []
            peer = side.peer
            assert peer is not None and peer.transport is not None and side.transport is not None
            if not peer.transport.is_closing():
                for data in held:
                    peer.transport.write(data)
            if held and not side.eof and not side.lost:
                side.transport.resume_reading()
        for side in (self.client, self.upstream):
            self._passed_on(side)

    def _passed_on(self, side: _Side) -> None:
        """A side that ended before its peer had a transport (the upstream reset while the client's was being
        made): its end reaches the peer now, as ``connection_lost`` and ``eof_received`` would have passed it."""
        peer = side.peer
        if not side.lost or peer is None or peer.transport is None or peer.transport.is_closing():
            return
        if self.reason == "reset":
            abort_with_reset(peer.transport)
        elif side.eof and peer.transport.can_write_eof():
            peer.transport.write_eof()
            self.maybe_done()
        else:
            peer.transport.close()

    @property
    def bytes_up(self) -> int:
        return self.client.received

    @property
    def bytes_down(self) -> int:
        return self.upstream.received

    def maybe_done(self) -> None:
        if self.client.eof and self.upstream.eof:
            for side in (self.client, self.upstream):
                if side.transport is not None:
                    side.transport.close()

    def finish(self, reason: str) -> None:
        """Tell ``on_close`` once, then let go of it (as ``StreamHandler.finish``); once both sides are lost (called
        again then, if one outlived the other: its peer never connected), of the sides' links too. Nothing will
        call a lost side again, so no cycle is left for the collector to find."""
        if not self.closed:
            self.closed = True
            on_close, self.on_close = self.on_close, None
            if on_close is not None:
                on_close(self, reason)
        if self.client.lost and self.upstream.lost:
            for side in (self.client, self.upstream):
                side.splice = side.peer = None

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                abort_with_reset(side.transport)
