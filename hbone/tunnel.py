"""One TLS connection carrying HBONE streams (``Tunnel``), and the seam between a stream and whatever
consumes it (``StreamHandler``): a TCP relay today, an HTTP codec (a waypoint's) tomorrow.

The tunnel is an asyncio protocol: bytes read from TLS go through the protocol layer, and each event is
handed to the handler of its stream within the same callback. It adds nothing per DATA frame beyond one
dictionary lookup and one method call.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import cast

from h2.errors import ErrorCodes

from hbone.events import ConnectionEnded, Data, Event, GoAwayReceived, StreamEnded, StreamReset, WindowOpened
from hbone.protocol import Connection

TLS_WRITE_HIGH_WATER = 4 * 1024 * 1024
READ_BUFFER_MAX = 256 * 1024  # what one read takes at most (uvloop's own TLS reads are of this size)
CLOSE_GRACE = 5.0  # seconds a closing connection gets to deliver what it has queued (the GOAWAY) before an abort


class StreamHandler(abc.ABC):
    """The consumer of one CONNECT stream.

    The tunnel calls the ``on_*`` methods; the handler answers through ``self.tunnel``: ``conn.send``
    (returns how much the windows took), ``conn.end``, ``conn.reset``, then ``flush()``. Back-pressure
    is the handler's to apply, both ways:

    * received data is acknowledged with ``conn.ack(stream_id, data.flow_length)`` only once it has been
      passed on; until then the peer's window stays that much smaller, so a slow consumer stops the sender;
    * what ``conn.send`` did not take waits in the handler until ``on_window``, and while the TLS
      transport is over its high-water mark (``on_tunnel_paused(True)``) the handler produces nothing.

    ``finish`` detaches the handler from its tunnel once the stream is over both ways (or reset).
    """

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None
        self.stream_id = 0
        self.closed = False
        self.on_close: Callable[[StreamHandler, str], None] | None = None

    def bind(self, tunnel: Tunnel, stream_id: int) -> None:
        """Take over ``stream_id`` of ``tunnel`` (from whatever handled it before)."""
        self.tunnel, self.stream_id = tunnel, stream_id
        tunnel.streams[stream_id] = self

    @property
    @abc.abstractmethod
    def buffered(self) -> int:
        """Bytes this handler holds for its stream (received and not passed on, or not yet sent)."""

    def on_open(self) -> None:  # noqa: B027 (a hook: most handlers have nothing to send before the answer)
        """A client's CONNECT for this stream was just queued: DATA may be queued behind it."""

    @abc.abstractmethod
    def start(self) -> None:
        """The stream is established (200 sent or received): deliver what waited, start producing."""

    @abc.abstractmethod
    def on_data(self, d: Data) -> None:
        """Data from the peer; acknowledge ``d.flow_length`` once it has been passed on."""

    @abc.abstractmethod
    def on_end(self) -> None:
        """END_STREAM: the peer will send no more (a TCP FIN)."""

    @abc.abstractmethod
    def on_reset(self, reason: str) -> None:
        """The stream is gone (reset by the peer, or the tunnel lost): stop using it and ``finish``."""

    @abc.abstractmethod
    def on_window(self) -> None:
        """The send windows opened: send what waits."""

    @abc.abstractmethod
    def on_tunnel_paused(self, paused: bool) -> None:
        """The TLS transport went over (True) or back under (False) its high-water mark."""

    def finish(self, reason: str) -> None:
        """The stream is over for this handler: detach from the tunnel and tell ``on_close`` once, then let go of
        it: whoever it belongs to usually refers back to this handler (to abort it), and a cycle left in place
        would hold the handler and its transport until the collector runs (several a connection, and the
        collector's passes with them)."""
        if self.closed:
            return
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.stream_closed(self)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close(self, reason)


class Tunnel(asyncio.BufferedProtocol):
    """One TLS connection carrying HBONE streams; base of the server's and the client's tunnels.

    A buffered protocol, so that TLS decrypts into a buffer the size of what is pending: for a plain protocol,
    uvloop reads into a new 256 KiB bytes object every time (mmap, mremap and munmap system calls, and fresh pages
    to fault in, on every read of a few hundred bytes). Each read gets its own buffer, so that received data can
    be passed on as views of it.
    """

    conn: Connection

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamHandler] = {}
        self.write_paused = False
        self.draining = False  # the peer's graceful GOAWAY: close once the streams left are done
        self.ended: ConnectionEnded | None = None
        self.on_stream_closed: Callable[[Tunnel], None] | None = None
        self.on_lost: Callable[[Tunnel], None] | None = None
        self._abort_later: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self.loop = asyncio.get_running_loop()  # once, not per stream (each lookup is a getpid(2) in CPython 3.11)
        self._read_buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=TLS_WRITE_HIGH_WATER)
        self.flush()

    def get_buffer(self, sizehint: int) -> bytearray:
        self._read_buffer = bytearray(min(sizehint, READ_BUFFER_MAX) if sizehint > 0 else READ_BUFFER_MAX)
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        buffer, self._read_buffer = self._read_buffer, bytearray()
        self.data_received(memoryview(buffer)[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        for ev in self.conn.receive(data):
            self.handle(ev)
        self.flush()

    def handle(self, ev: Event) -> None:
        # One dictionary lookup per event, not a chain of isinstance checks (event classes have no subclasses).
        getattr(self, _HANDLERS.get(type(ev), "handle_request_or_response"))(ev)

    def _data(self, ev: Data) -> None:
        handler = self.streams.get(ev.stream_id)
        if handler is None:
            self.conn.ack(ev.stream_id, ev.flow_length)
        else:
            handler.on_data(ev)

    def _window_opened(self, ev: WindowOpened) -> None:
        if ev.stream_id:
            handler = self.streams.get(ev.stream_id)
            if handler is not None:
                handler.on_window()
        else:
            for handler in list(self.streams.values()):
                handler.on_window()

    def _stream_ended(self, ev: StreamEnded) -> None:
        handler = self.streams.get(ev.stream_id)
        if handler is not None:
            handler.on_end()

    def handle_request_or_response(self, ev: Event) -> None:
        raise NotImplementedError

    def stream_reset(self, ev: StreamReset) -> None:
        handler = self.streams.get(ev.stream_id)
        if handler is not None:
            handler.on_reset(f"stream reset by peer (code {ev.error_code})")

    def going_away(self, ev: GoAwayReceived) -> None:
        self.draining = True
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.draining and not self.streams:
            self.close_transport()

    def connection_ended(self, ev: ConnectionEnded) -> None:
        self.ended = ev
        self.close_transport()

    def close_transport(self) -> None:
        """Write what is queued (a GOAWAY) and close; a peer that does not read gets an abort instead, at
        once if it is already not reading (the output is paused), else after ``CLOSE_GRACE``: a closed
        connection must not keep its buffers for a peer that never takes them."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.write_now()
        if self.write_paused:
            transport.abort()
            return
        transport.close()
        self._abort_later = self.loop.call_later(CLOSE_GRACE, transport.abort)

    def flush(self) -> None:
        """Write what the protocol layer has queued. With several streams on the tunnel, at the end of this turn
        of the event loop: what the other streams queue in the same turn (frames, answers, acknowledgements) goes
        out in the same TLS record and system call, a system call on a tunnel costing more than all the Python of
        a small frame. With one stream, now: nothing else would join it, and waiting for the end of the turn
        costs the loop another poll (measurable on request/response). Nothing when nothing is queued."""
        if self._flush_scheduled or self.transport is None or not self.conn.output_pending:
            return
        if len(self.streams) <= 1:
            self.write_now()
        else:
            self._flush_scheduled = True
            self.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        """Write what the protocol layer has queued, now (before a close)."""
        self._flush_scheduled = False
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.conn.output_blocked(True)
        for handler in self.streams.values():
            handler.on_tunnel_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.conn.output_blocked(False)
        for handler in list(self.streams.values()):
            handler.on_tunnel_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_later is not None:
            self._abort_later.cancel()
        if self.ended is None:
            self.ended = ConnectionEnded(0, f"connection lost: {exc}" if exc else "connection closed")
        for handler in list(self.streams.values()):
            handler.on_reset(f"tunnel {self.ended.reason}")
        self.conn.release()
        if self.on_lost is not None:
            self.on_lost(self)

    def stream_closed(self, handler: StreamHandler) -> None:
        if self.streams.get(handler.stream_id) is handler:
            del self.streams[handler.stream_id]
            if self.on_stream_closed is not None:
                self.on_stream_closed(self)
            self._close_if_drained()

    def close(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """GOAWAY, then close once written."""
        if self.transport is not None and not self.transport.is_closing():
            self.conn.goaway(code)
            self.close_transport()



# The method of ``Tunnel`` (or of its subclass) that takes each kind of event; requests and responses go to
# ``handle_request_or_response``.
_HANDLERS: dict[type, str] = {Data: "_data", WindowOpened: "_window_opened", StreamEnded: "_stream_ended",
                              StreamReset: "stream_reset", ConnectionEnded: "connection_ended",
                              GoAwayReceived: "going_away"}
