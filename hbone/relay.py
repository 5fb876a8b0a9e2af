"""The I/O half of HBONE: a TLS connection carrying CONNECT streams (``Tunnel``), each stream bridged to
one TCP connection (``Relay``).

Built on asyncio protocols rather than streams, so a chunk read from one socket is framed and written
to the other inside one callback, with no task switch. Back-pressure runs both ways and bounds memory:

* HTTP/2 -> TCP: received data is acknowledged (the peer's window reopened) only once the TCP
  transport has taken it below its high-water mark; a slow TCP reader therefore closes the HTTP/2
  window and the sender stops. Per stream, at most one window (4 MiB) plus the transport's buffer.
* TCP -> HTTP/2: what the windows cannot take is kept (one read's worth) and the TCP side stops
  reading until a WINDOW_UPDATE arrives; while the TLS transport is over its high-water mark, every
  stream of that tunnel stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

from hbone.protocol import (
    ConnectionEnded,
    Data,
    Event,
    StreamEnded,
    StreamReset,
    WindowOpened,
    _Connection,
)

log = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)
TCP_WRITE_HIGH_WATER = 1024 * 1024
TLS_WRITE_HIGH_WATER = 4 * 1024 * 1024


def linger_reset(sock: socket.socket) -> None:
    """Make closing ``sock`` send RST rather than FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Close a TCP transport with RST rather than FIN (how a reset crosses the tunnel)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        linger_reset(sock)
    transport.abort()  # type: ignore[attr-defined]


class Relay(asyncio.Protocol):
    """One CONNECT stream relayed to one TCP connection; the protocol of that TCP transport.

    Either side may come first: an inbound relay exists before its upstream TCP connection, an outbound
    relay's TCP connection (the captured client) exists before its stream. Until ``start`` the TCP side
    is not read; data arriving from the tunnel before the TCP side exists waits, unacknowledged.
    """

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None
        self.started = False
        self._backlog: memoryview | None = None  # read from TCP, not yet taken by the windows
        self._early: list[Data] = []  # from the tunnel before the TCP side existed
        self._unacked = 0  # written to TCP while its buffer was full; acknowledged on resume_writing
        self._tcp_full = False
        self._reading = False
        self._tcp_eof = False  # FIN from TCP (END_STREAM owed or sent)
        self._h2_eof = False  # END_STREAM from the tunnel (FIN sent to TCP)
        self.closed = False
        self.bytes_up = 0  # TCP -> tunnel
        self.bytes_down = 0  # tunnel -> TCP
        self.on_close: Callable[[Relay, str], None] | None = None

    @property
    def buffered(self) -> int:
        """Bytes this relay holds: unsent backlog, early data and the TCP transport's write buffer."""
        size = len(self._backlog or b"") + sum(len(d.data) for d in self._early)
        if self.transport is not None:
            size += self.transport.get_write_buffer_size()
        return size

    # -- wiring
    def bind(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel, self.stream_id = tunnel, stream_id
        tunnel.streams[stream_id] = self

    def start(self) -> None:
        """The tunnel stream is established: deliver what waited and start reading the TCP side."""
        self.started = True
        for d in self._early:
            self.on_data(d)
        self._early.clear()
        if self._backlog is not None:
            self.on_window()
        else:
            self._resume()

    # -- TCP side (asyncio.Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH_WATER)
        transport.pause_reading()
        if self.started:
            self.start()

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        tunnel = self.tunnel
        if self._backlog is not None or tunnel is None or not self.started:
            # Data before start (CPython 3.11 re-arms reading paused in connection_made) or racing a pause.
            self._backlog = memoryview(bytes(self._backlog or b"") + data)
            self._reading = True
            self._pause()
            return
        taken = tunnel.conn.send(self.stream_id, data)
        if taken < len(data):
            self._backlog = memoryview(data)[taken:]
            self._pause()
        tunnel.flush()

    def eof_received(self) -> bool:
        self._tcp_eof = True
        if self._backlog is None and self.tunnel is not None:
            self.tunnel.conn.end(self.stream_id)
            self.tunnel.flush()
        self._maybe_close()
        return True  # keep the write half open: half-close

    def pause_writing(self) -> None:
        self._tcp_full = True

    def resume_writing(self) -> None:
        self._tcp_full = False
        if self._unacked and self.tunnel is not None:
            self.tunnel.conn.ack(self.stream_id, self._unacked)
            self._unacked = 0
            self.tunnel.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        tunnel = self.tunnel
        if tunnel is not None and not (self._tcp_eof and self._h2_eof):
            if exc is not None or not self._tcp_eof:
                tunnel.conn.reset(self.stream_id)  # a TCP reset (or vanished socket) becomes RST_STREAM
            tunnel.flush()
        self.finish("reset by tcp peer" if exc else "closed")

    # -- tunnel side
    def on_data(self, d: Data) -> None:
        transport = self.transport
        if transport is None or not self.started:
            self._early.append(d)
            return
        transport.write(d.data)
        self.bytes_down += len(d.data)
        if self._tcp_full:
            self._unacked += d.flow_length
        else:
            assert self.tunnel is not None
            self.tunnel.conn.ack(self.stream_id, d.flow_length)

    def on_end(self) -> None:
        self._h2_eof = True
        if self.transport is not None and self.started:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._maybe_close()

    def on_reset(self, reason: str) -> None:
        if self.transport is not None:
            abort_with_reset(self.transport)
        self.finish(reason)

    def on_window(self) -> None:
        if self._backlog is None or self.tunnel is None:
            return
        taken = self.tunnel.conn.send(self.stream_id, self._backlog)
        self._backlog = self._backlog[taken:] if taken < len(self._backlog) else None
        if self._backlog is None:
            if self._tcp_eof:
                self.tunnel.conn.end(self.stream_id)
            else:
                self._resume()

    def on_tunnel_paused(self, paused: bool) -> None:
        if paused:
            self._pause()
        elif self._backlog is None:
            self._resume()

    # -- helpers
    def _pause(self) -> None:
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if (not self._reading and self.started and self.transport is not None and not self._tcp_eof
                and self.tunnel is not None and not self.tunnel.write_paused and not self.closed):
            self._reading = True
            self.transport.resume_reading()

    def _maybe_close(self) -> None:
        if self._tcp_eof and self._h2_eof and self.transport is not None:
            self.transport.close()
            self.finish("closed")

    def abort(self) -> None:
        """Reset both ways: RST to the TCP side (which in turn resets the stream)."""
        if self.transport is not None:
            abort_with_reset(self.transport)

    def finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.stream_closed(self)
        if self.on_close is not None:
            self.on_close(self, reason)


class Tunnel(asyncio.Protocol):
    """One TLS connection carrying HBONE streams; base of the server's and the client's tunnels."""

    conn: _Connection

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Relay] = {}
        self.write_paused = False
        self.ended: ConnectionEnded | None = None
        self.on_stream_closed: Callable[[Tunnel], None] | None = None
        self.on_lost: Callable[[Tunnel], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
        self.flush()

    def data_received(self, data: bytes) -> None:
        for ev in self.conn.receive(data):
            self.handle(ev)
        self.flush()

    def handle(self, ev: Event) -> None:
        if isinstance(ev, Data):
            relay = self.streams.get(ev.stream_id)
            if relay is None:
                self.conn.ack(ev.stream_id, ev.flow_length)
            else:
                relay.on_data(ev)
        elif isinstance(ev, WindowOpened):
            if ev.stream_id:
                relay = self.streams.get(ev.stream_id)
                if relay is not None:
                    relay.on_window()
            else:
                for relay in list(self.streams.values()):
                    relay.on_window()
        elif isinstance(ev, StreamEnded):
            relay = self.streams.get(ev.stream_id)
            if relay is not None:
                relay.on_end()
        elif isinstance(ev, StreamReset):
            self.stream_reset(ev)
        elif isinstance(ev, ConnectionEnded):
            self.connection_ended(ev)
        else:
            self.handle_request_or_response(ev)

    def handle_request_or_response(self, ev: Event) -> None:
        raise NotImplementedError

    def stream_reset(self, ev: StreamReset) -> None:
        relay = self.streams.get(ev.stream_id)
        if relay is not None:
            relay.on_reset(f"stream reset by peer (code {ev.error_code})")

    def connection_ended(self, ev: ConnectionEnded) -> None:
        self.ended = ev
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def pause_writing(self) -> None:
        self.write_paused = True
        for relay in self.streams.values():
            relay.on_tunnel_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        for relay in list(self.streams.values()):
            relay.on_tunnel_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ended is None:
            self.ended = ConnectionEnded(0, f"connection lost: {exc}" if exc else "connection closed")
        for relay in list(self.streams.values()):
            relay.on_reset(f"tunnel {self.ended.reason}")
        if self.on_lost is not None:
            self.on_lost(self)

    def stream_closed(self, relay: Relay) -> None:
        if self.streams.get(relay.stream_id) is relay:
            del self.streams[relay.stream_id]
            if self.on_stream_closed is not None:
                self.on_stream_closed(self)

    def close(self) -> None:
        """Graceful: GOAWAY, then close once written."""
        if self.transport is not None and not self.transport.is_closing():
            self.conn.goaway()
            self.flush()
            self.transport.close()

