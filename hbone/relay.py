"""A CONNECT stream bridged to one TCP connection (``Relay``): the stream handler of the tunnel (L4).

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
import logging
import socket
from typing import cast

from hbone.events import Data
from hbone.sockets import abort_with_reset
from hbone.tunnel import StreamHandler

log = logging.getLogger(__name__)

TCP_WRITE_HIGH_WATER = 1024 * 1024
# What an outbound relay reads from its accepted client before the CONNECT goes out, to send behind it. Well under
# the smallest initial window a peer may keep (65,535, HTTP/2's default), so that the windows take it whole.
PRELOAD_MAX = 16 * 1024


class Relay(StreamHandler, asyncio.Protocol):
    """One CONNECT stream relayed to one TCP connection; the protocol of that TCP transport.

    Either side may come first: an inbound relay exists before its upstream TCP connection, an outbound
    relay's TCP connection (the captured client) exists before its stream. Until ``start`` the TCP side
    is not read; data arriving from the tunnel before the TCP side exists waits, unacknowledged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.transport: asyncio.Transport | None = None
        self.started = False
        self._backlog: memoryview | None = None  # read from TCP, not yet taken by the windows
        self._early: list[Data] = []  # from the tunnel before the TCP side existed
        self._preload: bytes | None = None  # read from TCP before the stream opened (``preload_from``)
        self._preload_sent = False  # ... and sent behind the CONNECT, on the stream bound now
        self._unacked = 0  # written to TCP while its buffer was full; acknowledged on resume_writing
        self._tcp_full = False
        self._reading = False
        self._tcp_eof = False  # FIN from TCP (END_STREAM owed or sent)
        self._h2_eof = False  # END_STREAM from the tunnel (FIN sent to TCP)
        self.bytes_up = 0  # TCP -> tunnel
        self.bytes_down = 0  # tunnel -> TCP

    @property
    def buffered(self) -> int:
        """Bytes this relay holds: unsent backlog, early data and the TCP transport's write buffer."""
        size = len(self._backlog or b"") + sum(len(d.data) for d in self._early)
        if self.transport is not None:
            size += self.transport.get_write_buffer_size()
        return size

    def preload_from(self, sock: socket.socket) -> None:
        """Take what the client of an accepted ``sock`` (non-blocking) has sent already, to go out with the
        CONNECT (``on_open``): the first request of a client that speaks first then reaches the server without
        waiting for the CONNECT's answer, one tunnel round trip sooner. Nothing waiting (a server-first protocol),
        an EOF or an error leaves everything to the transport, as without it."""
        try:
            data = sock.recv(PRELOAD_MAX)
        except OSError:  # nothing waiting (EAGAIN), or reset: the transport will see it
            return
        if data:
            self._preload = data
            self.bytes_up += len(data)

    def on_open(self) -> None:
        """Send the preloaded data right behind the CONNECT (RFC 9113 §8.5: DATA follows a CONNECT's HEADERS),
        when the windows take all of it; else it waits for the answer like anything read later. Kept until the
        answer: a stream refused unprocessed is retried on another connection, data included."""
        preload, tunnel = self._preload, self.tunnel
        self._preload_sent = False
        if preload is not None and tunnel is not None and tunnel.conn.window(self.stream_id) >= len(preload):
            self._preload_sent = tunnel.conn.send(self.stream_id, preload) == len(preload)

    def start(self) -> None:
        """The tunnel stream is established: once the TCP side exists too, deliver what waited (data, then
        the peer's FIN) and start reading the TCP side."""
        self.started = True
        if self.transport is None:
            return
        if self._preload is not None:
            if not self._preload_sent:
                self._backlog = memoryview(self._preload)
            self._preload = None
        early, self._early = self._early, []
        for d in early:
            self.on_data(d)
        if self._h2_eof:
            self._write_eof()
        if self._backlog is not None:
            self.on_window()
        else:
            self._resume()

    # -- TCP side (asyncio.Protocol)
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.closed:  # the stream was reset before the TCP side existed: the reset reaches it now
            abort_with_reset(transport)
            return
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH_WATER)
        if self.started and self.tunnel is not None and not self.tunnel.write_paused:
            self._reading = True  # the stream is up already (outbound): read from the start, no pause and resume
        else:
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
            self._write_eof()

    def _write_eof(self) -> None:
        assert self.transport is not None
        if self.transport.can_write_eof() and not self.transport.is_closing():
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
